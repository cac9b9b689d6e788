"""Property-based tests of the OT core: REMD <= exact <= mean(C), zero on identical batches, permutation invariance, fused REMD = REMD of the cost."""
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from hypothesis.extra.numpy import arrays
from otkd_nb.cost import cosine_cost, cosine_cost_autograd
from otkd_nb.exact import exact_ot
from otkd_nb.remd import remd, cosine_remd
from otkd_nb.ipot import ipot

floats = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)

@st.composite
def batches(draw, max_b=12, max_d=6):
    b, d = draw(st.integers(1, max_b)), draw(st.integers(1, max_d))
    x = draw(arrays('float64', (b, d), elements=floats))
    y = draw(arrays('float64', (b, d), elements=floats))
    return torch.from_numpy(x), torch.from_numpy(y)

cfg = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

@cfg
@given(batches())
def test_remd_below_exact_below_mean(xy):
    C = cosine_cost(*xy)
    r, e = remd(C).item(), exact_ot(C)[0].item()
    assert r <= e + 1e-9
    assert e <= C.mean().item() + 1e-9

@cfg
@given(batches())
def test_zero_for_identical_batches(xy):
    x, _ = xy
    # A zero vector costs 1 even against itself (see cosine_cost's eps), so the property holds for nonzero rows only:
    # replace rows of (near) zero norm by a fixed nonzero vector rather than shift every row (a shift can land on zero).
    x = torch.where(x.norm(dim=-1, keepdim=True) > 1e-3, x, torch.ones_like(x))
    C = cosine_cost(x, x)
    assert abs(remd(C).item()) < 1e-9
    assert abs(exact_ot(C)[0].item()) < 1e-9
    # IPOT is inexact: after t iterations an off-diagonal entry of cost c keeps a weight ~exp(-t c / beta), so it
    # adds at most c exp(-t c / beta) <= beta / (e t) to the value; at the defaults (beta 0.05, 100 iterations) < 5e-4.
    assert 0 <= ipot(C)[0].item() <= 0.05 / 100

@cfg
@given(batches(), st.randoms(use_true_random=False))
def test_permutation_invariance(xy, rnd):
    x, y = xy
    px, py = list(range(len(x))), list(range(len(y)))
    rnd.shuffle(px); rnd.shuffle(py)
    C, Cp = cosine_cost(x, y), cosine_cost(x[px], y[py])
    assert abs(remd(C).item() - remd(Cp).item()) < 1e-9
    assert abs(exact_ot(C)[0].item() - exact_ot(Cp)[0].item()) < 1e-9
    assert abs(ipot(C)[0].item() - ipot(Cp)[0].item()) < 1e-9

@cfg
@given(batches(max_b=6), st.floats(0.01, 100))
def test_cost_range_and_scale_invariance(xy, s):
    x, y = xy
    C = cosine_cost(x, y)
    assert C.min() >= 0 and C.max() <= 2
    nz = (x.norm(dim=-1) > 1e-3)
    assert torch.allclose(cosine_cost(s * x, y)[nz], C[nz], atol=1e-9)

@cfg
@given(batches(max_b=6))
def test_cost_gradient_matches_autograd_formula(xy):
    "The hand-written backward of cosine_cost equals autograd through the formula, except on (near-)zero rows, which get 0."
    x, y = (t.clone().requires_grad_() for t in xy)
    g = torch.rand(len(x), len(y), dtype=torch.float64)
    gx, gy = torch.autograd.grad((cosine_cost(x, y) * g).sum(), (x, y))
    rx, ry = torch.autograd.grad((cosine_cost_autograd(x, y) * g).sum(), (x, y))
    for grad, ref, t in ((gx, rx, x), (gy, ry, y)):
        ok = t.detach().norm(dim=-1) > 1e-3
        assert torch.allclose(grad[ok], ref[ok], rtol=1e-6, atol=1e-9)
        assert (grad[t.detach().norm(dim=-1) < 1e-8] == 0).all()

@cfg
@given(batches())
def test_cosine_remd_value_is_remd_of_cosine_cost(xy):
    "Any input, zero rows and ties included: the fused form gives the composed value."
    x, y = xy
    assert abs(cosine_remd(x, y).item() - remd(cosine_cost(x, y)).item()) < 1e-12

@cfg
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(1, 12), st.integers(2, 6), st.integers(1, 3))
def test_cosine_remd_gradients_match_the_formula(seed, n, m, d, B):
    "Rectangular batches of generic (tie-free) features: gradients of both sides equal those of the formula through autograd."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, generator=g, dtype=torch.float64)  # a different upstream gradient per problem, either sign
    v, v0 = cosine_remd(x, y), remd(cosine_cost_autograd(x, y))
    assert torch.allclose(v, v0, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad((w * v).sum(), (x, y)), torch.autograd.grad((w * v0).sum(), (x, y))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)

@cfg
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5))
def test_cost_of_feature_maps_is_the_cosine_of_the_flattened_maps(seed, b, c, h, w):
    "Rank-4 feature maps `(b, c, h, w)`: C_ij = 1 - <x_i, y_j> / (|x_i| |y_j|) over the c*h*w values, written out in NumPy."
    import numpy as np
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, c, h, w, generator=g, dtype=torch.float64), torch.randn(b + 1, c, h, w, generator=g, dtype=torch.float64)
    X, Y = x.numpy().reshape(b, -1), y.numpy().reshape(b + 1, -1)
    want = np.array([[1 - X[i] @ Y[j] / (np.linalg.norm(X[i]) * np.linalg.norm(Y[j])) for j in range(b + 1)] for i in range(b)])
    got = cosine_cost(x, y)
    assert got.shape == (b, b + 1)
    np.testing.assert_allclose(got.numpy(), np.clip(want, 0, 2), atol=1e-12)
