"""exact_ot against POT's network simplex (ot.emd2 / ot.emd) on many random problems of several kinds."""
import numpy as np, ot, pytest, torch
from otkd_nb.cost import cosine_cost, clustered_features
from otkd_nb.exact import exact_ot

def _problems():
    "About 130 (C, a, b) problems: Gaussian, clustered, ties/duplicates, non-uniform weights, rectangular."
    rng = np.random.default_rng(0)
    out = []
    for i in range(30):  # Gaussian features, cosine cost, uniform square
        n, d = rng.integers(2, 40), rng.integers(1, 20)
        x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        out.append(('gauss', cosine_cost(torch.tensor(x), torch.tensor(y)).numpy(), None, None))
    for i in range(25):  # clustered features
        n = int(rng.integers(4, 64))
        x, y = clustered_features(n, 16, k=int(rng.integers(2, 6)), seed=i, dtype=torch.float64)
        out.append(('clustered', cosine_cost(x, y).numpy(), None, None))
    for i in range(25):  # ties and duplicate points: integer costs, repeated rows
        n = int(rng.integers(3, 30))
        x = rng.normal(size=(n // 2 + 1, 4)); x = x[rng.integers(0, len(x), n)]
        y = x[rng.permutation(n)] if i % 2 else rng.normal(size=(n, 4))
        C = cosine_cost(torch.tensor(x), torch.tensor(y)).numpy()
        if i % 3 == 0: C = rng.integers(0, 3, size=(n, n)).astype(float)
        out.append(('ties', C, None, None))
    for i in range(25):  # non-uniform weights, square and rectangular
        n, m = int(rng.integers(2, 30)), int(rng.integers(2, 30))
        a, b = rng.random(n) + 0.01, rng.random(m) + 0.01
        out.append(('weights', rng.random((n, m)), a / a.sum(), b / b.sum()))
    for i in range(25):  # rectangular, uniform weights
        n, m = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        out.append(('rect', cosine_cost(torch.tensor(rng.normal(size=(n, 8))), torch.tensor(rng.normal(size=(m, 8)))).numpy(), None, None))
    return out

PROBLEMS = _problems()

@pytest.mark.parametrize('kind,C,a,b', PROBLEMS, ids=[f'{p[0]}-{i}' for i, p in enumerate(PROBLEMS)])
def test_exact_matches_pot(kind, C, a, b):
    n, m = C.shape
    ua = np.full(n, 1 / n) if a is None else a
    ub = np.full(m, 1 / m) if b is None else b
    ref = ot.emd2(ua, ub, C, numItermax=1_000_000)
    Ct = torch.tensor(C, requires_grad=True)
    v, P = exact_ot(Ct, None if a is None else torch.tensor(a), None if b is None else torch.tensor(b))
    assert abs(v.item() - ref) <= 1e-9 * max(1.0, abs(ref))
    np.testing.assert_allclose(P.sum(-1).numpy(), ua, atol=1e-6)
    np.testing.assert_allclose(P.sum(-2).numpy(), ub, atol=1e-6)
    assert (P >= 0).all()
    v.backward()
    assert torch.equal(Ct.grad, P)  # the envelope gradient is the plan

@pytest.mark.parametrize('seed', range(10))
def test_gradient_is_pots_plan(seed):
    "Without ties the optimal plan is unique, so the gradient must be POT's plan itself."
    rng = np.random.default_rng(100 + seed)
    n, m = int(rng.integers(2, 30)), int(rng.integers(2, 30))
    C = rng.random((n, m))
    a, b = rng.random(n) + 0.1, rng.random(m) + 0.1
    a, b = a / a.sum(), b / b.sum()
    Ct = torch.tensor(C, requires_grad=True)
    exact_ot(Ct, torch.tensor(a), torch.tensor(b))[0].backward()
    np.testing.assert_allclose(Ct.grad.numpy(), ot.emd(a, b, C), atol=1e-12)
    Cs = torch.tensor(rng.random((n, n)), requires_grad=True)  # uniform square: the assignment path
    exact_ot(Cs)[0].backward()
    np.testing.assert_allclose(Cs.grad.numpy(), ot.emd(np.full(n, 1 / n), np.full(n, 1 / n), Cs.detach().numpy()), atol=1e-12)

def test_batched_equals_one_by_one():
    C = torch.rand(2, 3, 7, 7, dtype=torch.float64)
    v, P = exact_ot(C)
    assert v.shape == (2, 3) and P.shape == (2, 3, 7, 7)
    for i in range(2):
        for j in range(3):
            vi, Pi = exact_ot(C[i, j])
            assert torch.allclose(v[i, j], vi) and torch.equal(P[i, j], Pi)

def test_batched_weights_broadcast():
    C = torch.rand(4, 5, 6, dtype=torch.float64)
    a = torch.rand(4, 5, dtype=torch.float64); a = a / a.sum(-1, keepdim=True)
    v, P = exact_ot(C, a=a)
    for i in range(4):
        assert abs(v[i].item() - ot.emd2(a[i].numpy(), np.full(6, 1 / 6), C[i].numpy())) < 1e-9

@pytest.mark.parametrize('C,msg', [
    (torch.rand(5), 'rank >= 2'),
    (torch.rand(0, 5), 'empty'),
    (torch.rand(3, 0), 'empty'),
    (torch.tensor([[0.1, float('nan')], [0.2, 0.3]]), 'NaN or Inf'),
    (torch.tensor([[0.1, float('inf')], [0.2, 0.3]]), 'NaN or Inf'),
])
def test_bad_input(C, msg):
    with pytest.raises(ValueError, match=msg): exact_ot(C)

def test_bad_weights():
    with pytest.raises(ValueError, match='negative'): exact_ot(torch.rand(2, 2), a=torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match='same total mass'): exact_ot(torch.rand(2, 2), a=torch.tensor([0.7, 0.7]))
    with pytest.raises(ValueError, match='NaN or Inf'): exact_ot(torch.rand(2, 2), b=torch.tensor([float('nan'), 0.5]))
