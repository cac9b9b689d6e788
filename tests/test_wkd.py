"""Tests of `otkd_nb.wkd` (WKD, Lv, Yang and Li, NeurIPS 2024) against independent computations: POT's log-domain
Sinkhorn, `ot.emd2`, POT's envelope gradient and Bures-Wasserstein distance, NumPy/SciPy formulas in float64, finite
differences; plus mixed precision and error messages."""
import math
import numpy as np, ot, pytest, scipy.linalg as sl, torch, torch.nn.functional as F
from otkd_nb.wkd import (class_cost_from_weights, class_cost_cka, sharpen_cost, WassersteinLogitLoss, wkd_target_loss,
                         feature_gaussian, sqrtm_psd, GaussianWassersteinLoss, WKD_PAPER)

def rnd(seed, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)

def np_cos_cost(W):
    W = np.asarray(W, float)
    n = np.linalg.norm(W, axis=1)
    C = np.array([[1 - W[i] @ W[j] / (n[i] * n[j]) for j in range(len(W))] for i in range(len(W))])
    np.fill_diagonal(C, 0)
    return C

@pytest.fixture(scope='module')
def cost():
    "A 7-class cost in float64: cosine distance of random class vectors, sharpened by hand."
    return torch.tensor(1 - np.exp(-np_cos_cost(rnd(0, 7, 4).numpy())))

def per_sample(loss, s, t, target=None):
    "One value per row, through the public `forward`."
    return torch.stack([loss(s[j:j+1], t[j:j+1], None if target is None else target[j:j+1]) for j in range(len(s))])

def softmax_np(z, T):
    z = np.asarray(z, float) / T
    e = np.exp(z - z.max())
    return e / e.sum()

# ---------------------------------------------------------------- class costs

def test_class_cost_from_weights_matches_numpy():
    W = rnd(1, 9, 5)
    C = class_cost_from_weights(W)
    np.testing.assert_allclose(C.numpy(), np_cos_cost(W.numpy()), atol=1e-12)
    assert (C.diagonal() == 0).all() and torch.equal(C, C.T) and C.min() >= 0 and C.max() <= 2
    # float32 weights give a float32 cost; a zero row is at distance 1 from every class; row scales do not matter
    test32 = class_cost_from_weights(W.float() * torch.rand(9, 1) * 10)
    assert test32.dtype == torch.float32
    np.testing.assert_allclose(test32.numpy(), np_cos_cost(W.numpy()), atol=1e-5)
    Cz = class_cost_from_weights(torch.tensor([[1., 2.], [0., 0.], [3., -1.]]))
    assert Cz[1, 0] == Cz[1, 2] == 1

@pytest.mark.parametrize('W', [torch.randn(5), torch.randn(1, 4), torch.randn(2, 3, 4)])
def test_class_cost_from_weights_rejects_bad_shapes(W):
    with pytest.raises(ValueError, match='n_classes, d'): class_cost_from_weights(W)

def test_class_cost_from_weights_rejects_nan():
    W = torch.randn(4, 3); W[2, 1] = float('nan')
    with pytest.raises(ValueError, match='NaN or Inf'): class_cost_from_weights(W)

def np_cka(a, b):
    "The paper's linear CKA, pre-centred, rows paired by index."
    a, b = a - a.mean(0), b - b.mean(0)
    return np.linalg.norm(b.T @ a, 'fro') ** 2 / (np.linalg.norm(a.T @ a, 'fro') * np.linalg.norm(b.T @ b, 'fro'))

@pytest.mark.parametrize('n,d', [(5, 8), (8, 8), (40, 6)])  # the Gram route (n <= d) and the d x d route (n > d)
def test_class_cost_cka_matches_numpy(n, d):
    Z = rnd(2, 5, n, d)
    ref = np.array([[0 if i == j else 1 - np_cka(Z[i].numpy(), Z[j].numpy()) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(class_cost_cka(Z).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(class_cost_cka(Z, chunk=2).numpy(), ref, atol=1e-12)

def test_class_cost_cka_lists_truncate_and_feature_maps():
    xs = [rnd(3, 12, 4), rnd(4, 9, 4), rnd(5, 15, 4)]  # the first 9 rows of each class, as the paper's code
    ref = np.array([[0 if i == j else 1 - np_cka(xs[i][:9].numpy(), xs[j][:9].numpy()) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(class_cost_cka(xs).numpy(), ref, atol=1e-12)
    fm = rnd(6, 3, 4, 5, 2, 3)  # 3 classes, 4 images, 5 channels, 2 x 3 positions: rows by image, then position
    rows = [np.concatenate([fm[k, m].reshape(5, -1).T.numpy() for m in range(4)]) for k in range(3)]
    ref = np.array([[0 if i == j else 1 - np_cka(rows[i], rows[j]) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(class_cost_cka(fm).numpy(), ref, atol=1e-12)

def test_class_cost_cka_invariances():
    X = rnd(7, 20, 6)
    Q = torch.linalg.qr(rnd(8, 6, 6))[0]
    C = class_cost_cka([X, 2.5 * X @ Q + 3., rnd(9, 20, 6)])
    assert abs(C[0, 1]) < 1e-12 and C[0, 2] > 0.05 and torch.equal(C, C.T)

def test_class_cost_cka_errors():
    with pytest.raises(ValueError, match='at least 2 classes'): class_cost_cka([torch.randn(5, 3)])
    with pytest.raises(ValueError, match='same feature size'): class_cost_cka([torch.randn(5, 3), torch.randn(5, 4)])
    with pytest.raises(ValueError, match='at least 2 samples'): class_cost_cka([torch.randn(1, 3), torch.randn(5, 3)])
    with pytest.raises(ValueError, match=r'or `\(m, c, h, w\)`'): class_cost_cka([torch.randn(5, 3, 2), torch.randn(5, 3, 2)])

def test_sharpen_cost():
    C = torch.rand(6, 6, dtype=torch.float64) * 2
    np.testing.assert_allclose(sharpen_cost(C, 1.5).numpy(), 1 - np.exp(-1.5 * C.numpy()), atol=1e-15)
    with pytest.raises(ValueError, match='kappa'): sharpen_cost(C, 0.)

# ---------------------------------------------------------------- WKD-L against POT

def pot_sinkhorn_cost(a, b, M, reg):
    "<P, M> for POT's log-domain Sinkhorn plan, run to convergence (the entropy term is not part of the value)."
    P = ot.bregman.sinkhorn_log(a, b, M, reg, numItermax=200000, stopThr=1e-15)
    return float((P * M).sum())

@pytest.mark.parametrize('T,reg', [(1., 0.1), (4., 0.05), (2., 0.02)])
def test_wasserstein_logit_loss_matches_pot_sinkhorn(cost, T, reg):
    zs, zt = rnd(10, 4, 7) * 2, rnd(11, 4, 7) * 2
    loss = WassersteinLogitLoss(cost, T=T, reg=reg, n_iter=5000)
    per = per_sample(loss, zs, zt)
    M = cost.numpy()
    ref = [pot_sinkhorn_cost(softmax_np(zt[i], T), softmax_np(zs[i], T), M, reg) for i in range(4)]
    np.testing.assert_allclose(per.numpy(), ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(loss(zs, zt).item(), np.mean(ref), atol=1e-10)
    # no T**2 factor, and the teacher's side receives no gradient
    zs_, zt_ = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    loss(zs_, zt_).backward()
    assert zt_.grad is None and zs_.grad.abs().sum() > 0

def test_wasserstein_logit_loss_approaches_emd(cost):
    zs, zt = rnd(12, 3, 7), rnd(13, 3, 7)
    M = cost.numpy()
    exact = np.array([ot.emd2(softmax_np(zt[i], 1), softmax_np(zs[i], 1), M) for i in range(3)])
    errs = []
    for reg, it in [(0.1, 500), (0.01, 5000), (1e-3, 30000)]:
        got = per_sample(WassersteinLogitLoss(cost, T=1, reg=reg, n_iter=it), zs, zt).numpy()
        assert np.isfinite(got).all()  # the log domain does not underflow at reg = 1e-3 (exp(-C/reg) would, for C > 0.75)
        errs.append(np.abs(got - exact).max())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5, errs

def test_plan_marginals_and_orientation(cost):
    zs, zt = rnd(14, 5, 7), rnd(15, 5, 7)
    loss = WassersteinLogitLoss(cost, T=2, reg=0.05, n_iter=3)
    P = loss.plan(zs, zt)
    assert P.shape == (5, 7, 7) and not P.requires_grad
    np.testing.assert_allclose(P.sum(1).numpy(), F.softmax(zs / 2, 1).numpy(), atol=1e-12)  # columns: the student, after any sweep
    P = WassersteinLogitLoss(cost, T=2, reg=0.05, n_iter=3000).plan(zs, zt)
    np.testing.assert_allclose(P.sum(2).numpy(), F.softmax(zt / 2, 1).numpy(), atol=1e-9)  # rows: the teacher, at convergence

def test_log_domain_agrees_with_a_plain_sinkhorn(cost):
    "The same sweeps in the plain domain, written here from the update rules, give the same value after few sweeps."
    zs, zt = rnd(16, 3, 7), rnd(17, 3, 7)
    reg, T, n_iter = 0.1, 2., 7
    K = np.exp(-cost.numpy() / reg)
    ref = []
    for i in range(3):
        a, b = softmax_np(zt[i], T), softmax_np(zs[i], T)
        v = np.ones(7)
        for _ in range(n_iter):
            u = a / (K @ v)
            v = b / (K.T @ u)
        ref.append(float(((u[:, None] * K * v[None, :]) * cost.numpy()).sum()))
    np.testing.assert_allclose(per_sample(WassersteinLogitLoss(cost, T=T, reg=reg, n_iter=n_iter), zs, zt).numpy(), ref, atol=1e-12)

def test_envelope_gradient_matches_pot(cost):
    zs, zt = rnd(18, 3, 7).requires_grad_(), rnd(19, 3, 7)
    WassersteinLogitLoss(cost, T=2, reg=0.1, n_iter=3000, unroll=False)(zs, zt).backward()
    ours, zs.grad = zs.grad.clone(), None
    total = sum(ot.solve(cost, F.softmax(zt[i] / 2, -1), F.softmax(zs[i] / 2, -1), reg=0.1, grad='envelope',
                         max_iter=200000, tol=1e-14).value for i in range(3))
    (total / 3).backward()
    np.testing.assert_allclose(ours.numpy(), zs.grad.numpy(), atol=1e-10)
    # the forward value is the same as with unrolling
    v1 = WassersteinLogitLoss(cost, T=2, reg=0.1, n_iter=50, unroll=False)(zs, zt)
    v2 = WassersteinLogitLoss(cost, T=2, reg=0.1, n_iter=50)(zs, zt)
    assert abs(v1.item() - v2.item()) < 1e-14

@pytest.mark.parametrize('n_iter', [1, 10])
def test_wasserstein_logit_loss_gradcheck(cost, n_iter):
    zs, zt = rnd(20, 3, 7).requires_grad_(), rnd(21, 3, 7)
    assert torch.autograd.gradcheck(lambda z: WassersteinLogitLoss(cost, T=2, n_iter=n_iter)(z, zt), (zs,))
    y = torch.tensor([0, 3, 6])
    assert torch.autograd.gradcheck(lambda z: WassersteinLogitLoss(cost, T=2, n_iter=n_iter)(z, zt, target=y), (zs,))

def test_target_separation_matches_pot(cost):
    zs, zt, y = rnd(22, 4, 7) * 2, rnd(23, 4, 7) * 2, torch.tensor([0, 6, 3, 3])
    got = per_sample(WassersteinLogitLoss(cost, T=4, reg=0.05, n_iter=5000), zs, zt, y).numpy()
    ref = []
    for i in range(4):
        keep = [k for k in range(7) if k != y[i]]
        M = cost.numpy()[np.ix_(keep, keep)]
        ref.append(pot_sinkhorn_cost(softmax_np(zt[i, keep], 4), softmax_np(zs[i, keep], 4), M, 0.05))
    np.testing.assert_allclose(got, ref, atol=1e-10)
    batched = WassersteinLogitLoss(cost, T=4, reg=0.05, n_iter=5000)(zs, zt, target=y)
    np.testing.assert_allclose(batched.item(), np.mean(ref), atol=1e-10)

def test_wkd_target_loss_matches_numpy():
    zs, zt, y = rnd(24, 5, 6), rnd(25, 5, 6), torch.tensor([0, 1, 5, 2, 2])
    ref = -np.mean([softmax_np(zt[i], 1)[y[i]] * np.log(softmax_np(zs[i], 1)[y[i]]) for i in range(5)])
    assert abs(wkd_target_loss(zs, zt, y).item() - ref) < 1e-12
    with pytest.raises(ValueError, match=r'\(b,\)'): wkd_target_loss(zs, zt, y[:3])

def test_wasserstein_logit_loss_autocast_bfloat16():
    C = class_cost_from_weights(torch.randn(10, 6))
    zs, zt = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
    for unroll in (True, False):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            v = WassersteinLogitLoss(C, unroll=unroll)(zs.bfloat16(), zt.bfloat16())
        assert v.dtype == torch.float32 and torch.isfinite(v)
        v.backward()
        assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
        zs.grad = None

def test_wasserstein_logit_loss_state_and_device():
    C = class_cost_from_weights(torch.randn(5, 3))
    loss = WassersteinLogitLoss(C)
    assert 'cost' in dict(loss.named_buffers()) and 'cost' in loss.state_dict()
    C.fill_(0)  # the loss keeps its own copy
    assert loss.cost.abs().sum() > 0
    assert loss.double().cost.dtype == torch.float64
    assert 'n_classes=5' in repr(loss)

def test_wasserstein_logit_loss_errors():
    C = class_cost_from_weights(torch.randn(5, 3))
    with pytest.raises(ValueError, match='square'): WassersteinLogitLoss(torch.rand(5, 4))
    with pytest.raises(ValueError, match='square'): WassersteinLogitLoss(torch.rand(5))
    with pytest.raises(ValueError, match='square'): WassersteinLogitLoss([[0., 1.], [1., 0.]])
    for bad in (float('nan'), float('inf')):
        Cb = C.clone(); Cb[1, 2] = bad
        with pytest.raises(ValueError, match='NaN or Inf'): WassersteinLogitLoss(Cb)
    with pytest.raises(ValueError, match='>= 0'): WassersteinLogitLoss(C - 0.5)
    with pytest.raises(ValueError, match='> 0'): WassersteinLogitLoss(C, T=0)
    with pytest.raises(ValueError, match='> 0'): WassersteinLogitLoss(C, reg=-1)
    with pytest.raises(ValueError, match='n_iter'): WassersteinLogitLoss(C, n_iter=0)
    loss = WassersteinLogitLoss(C)
    with pytest.raises(ValueError, match='4 classes but the cost is 5 x 5'): loss(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match='same shape'): loss(torch.randn(2, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match='same shape'): loss(torch.randn(2, 5, 1), torch.randn(2, 5, 1))
    with pytest.raises(ValueError, match='integer label'): loss(torch.randn(2, 5), torch.randn(2, 5), target=torch.zeros(2))
    with pytest.raises(ValueError, match='integer label'): loss(torch.randn(2, 5), torch.randn(2, 5), target=torch.zeros(3, dtype=torch.long))
    nan = torch.randn(2, 5); nan[0, 0] = float('nan')
    with pytest.raises(ValueError, match='student_logits'): WassersteinLogitLoss(C, check=True)(nan, torch.randn(2, 5))
    with pytest.raises(ValueError, match='teacher_logits'): WassersteinLogitLoss(C, check=True)(torch.randn(2, 5), nan * float('inf'))

# ---------------------------------------------------------------- WKD-F

def np_stats(x):
    "Per-sample mean and unbiased covariance over the positions, in float64."
    x = np.asarray(x, float).reshape(x.shape[0], x.shape[1], -1)
    return x.mean(-1), np.stack([np.cov(s) for s in x])

def test_feature_gaussian():
    x = rnd(30, 3, 4, 5, 2)
    mu, S = feature_gaussian(x)
    m_ref, S_ref = np_stats(x.numpy())
    np.testing.assert_allclose(mu.numpy(), m_ref, atol=1e-14); np.testing.assert_allclose(S.numpy(), S_ref, atol=1e-13)
    np.testing.assert_allclose(feature_gaussian(x, 'diag')[1].numpy(), x.var((2, 3)).numpy(), atol=1e-13)
    np.testing.assert_allclose(feature_gaussian(x, unbiased=False)[1].numpy(), S_ref * 9 / 10, atol=1e-13)

def test_sqrtm_psd_against_scipy_and_repeated_eigenvalues():
    A = rnd(31, 3, 6, 6)
    S = A @ A.mT + 0.1 * torch.eye(6, dtype=torch.float64)
    R = sqrtm_psd(S)
    for i in range(3): np.testing.assert_allclose(R[i].numpy(), sl.sqrtm(S[i].numpy()).real, atol=1e-10)
    # a singular PSD matrix: eigenvalues clamped at 0, R @ R == S
    B = rnd(32, 6, 2); Ssing = B @ B.T
    R = sqrtm_psd(Ssing)
    np.testing.assert_allclose((R @ R).numpy(), Ssing.numpy(), atol=1e-10)
    assert np.linalg.eigvalsh(R.numpy()).min() > -1e-7
    # the gradient at exactly repeated eigenvalues: finite and equal to the Frechet derivative
    lam = torch.tensor([2., 2., 2., 5., 5.], dtype=torch.float64)
    Q = torch.linalg.qr(rnd(33, 5, 5))[0]
    S = (Q @ torch.diag(lam) @ Q.T).requires_grad_()
    G = rnd(34, 5, 5)
    (sqrtm_psd(S) * G).sum().backward()
    Gs = Q.T @ ((G + G.T) / 2) @ Q
    expected = Q @ (Gs / (lam.sqrt()[:, None] + lam.sqrt()[None, :])) @ Q.T
    np.testing.assert_allclose(S.grad.numpy(), expected.numpy(), atol=1e-12)
    # and a finite-difference check on a matrix with a repeated eigenvalue
    S0 = torch.diag(torch.tensor([1., 1., 3.], dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: sqrtm_psd(s), (S0,))

def np_w2_full(xs, xt, eps):
    "Squared W2 between the per-sample Gaussians, by SciPy's sqrtm in float64, on S + eps I."
    ms, Ss = np_stats(xs); mt, St = np_stats(xt)
    out = []
    for i in range(len(ms)):
        a, b = Ss[i] + eps * np.eye(len(Ss[i])), St[i] + eps * np.eye(len(Ss[i]))
        rb = sl.sqrtm(b).real
        out.append(((ms[i] - mt[i]) ** 2).sum() + np.trace(a) + np.trace(b) - 2 * np.trace(sl.sqrtm(rb @ a @ rb).real))
    return np.array(out)

@pytest.mark.parametrize('eps', [0., 1e-5, 1e-2])
def test_gaussian_full_matches_pot(eps):
    xs, xt = rnd(40, 4, 5, 4, 4), rnd(41, 4, 5, 4, 4) * 1.5 + 0.3  # 5 channels, 16 positions: regular covariances
    ms, Ss = np_stats(xs.numpy()); mt, St = np_stats(xt.numpy())
    I = eps * np.eye(5)
    ref = ot.gaussian.bures_wasserstein_distance(ms, mt, Ss + I, St + I, paired=True) ** 2
    loss = GaussianWassersteinLoss('full', eps=eps)
    np.testing.assert_allclose(loss(xs, xt).item(), ref.mean(), rtol=1e-10)
    m, c = loss.terms(xs, xt)
    np.testing.assert_allclose(m.item(), ((ms - mt) ** 2).sum(1).mean(), rtol=1e-12)
    np.testing.assert_allclose(GaussianWassersteinLoss('full', eps=eps, mean_weight=4., cov_weight=0.5)(xs, xt).item(),
                               4 * m.item() + 0.5 * c.item(), rtol=1e-12)
    np.testing.assert_allclose(loss(xs, xt).item(), np_w2_full(xs.numpy(), xt.numpy(), eps).mean(), rtol=1e-9)

@pytest.mark.parametrize('eps', [0., 1e-3])
def test_gaussian_full_rank_deficient(eps):
    "More channels than positions: singular covariances. References: an eigendecomposition in float64 (NumPy) and,"
    " for eps = 0, the exact form in the positions, the nuclear norm of Zs^T Zt / (hw - 1)."
    xs, xt = rnd(42, 3, 8, 2, 2), rnd(43, 3, 8, 2, 2)  # 8 channels, 4 positions: rank 3
    ms, Ss = np_stats(xs.numpy()); mt, St = np_stats(xt.numpy())
    ref = []
    for i in range(3):
        a, b = Ss[i] + eps * np.eye(8), St[i] + eps * np.eye(8)
        la, Va = np.linalg.eigh(a); ra = (Va * np.sqrt(np.clip(la, 0, None))) @ Va.T
        lb, Vb = np.linalg.eigh(b); rb = (Vb * np.sqrt(np.clip(lb, 0, None))) @ Vb.T
        cross = np.linalg.svd(ra @ rb, compute_uv=False).sum()
        if eps == 0:
            zs = xs[i].reshape(8, -1).numpy(); zt = xt[i].reshape(8, -1).numpy()
            zs, zt = zs - zs.mean(1, keepdims=True), zt - zt.mean(1, keepdims=True)
            exact = np.linalg.svd(zs.T @ zt, compute_uv=False).sum() / 3
            assert abs(cross - exact) < 1e-9
        ref.append(((ms[i] - mt[i]) ** 2).sum() + np.trace(a) + np.trace(b) - 2 * cross)
    got = GaussianWassersteinLoss('full', eps=eps)(xs, xt).item()
    np.testing.assert_allclose(got, np.mean(ref), atol=1e-9)
    np.testing.assert_allclose(GaussianWassersteinLoss('full', eps=eps, double=False)(xs.float(), xt.float()).item(),
                               np.mean(ref), rtol=1e-4)

@pytest.mark.parametrize('shape', [(3, 4, 5, 5), (3, 16, 2, 2)])
def test_gaussian_identical_inputs_give_zero(shape):
    x = rnd(44, *shape) * 3
    for cov in ('diag', 'full'):
        for eps in (0., 1e-5):
            assert abs(GaussianWassersteinLoss(cov, eps=eps)(x, x.clone()).item()) < 1e-9
    assert abs(GaussianWassersteinLoss('full', double=False)(x.float(), x.float()).item()) < 1e-3 * float(x.var() * shape[1])

def test_gaussian_diag_matches_numpy_and_the_paper_formula():
    xs, xt = rnd(45, 4, 6, 3, 5), rnd(46, 4, 6, 3, 5) * 2
    eps = 1e-5
    ms, Ss = np_stats(xs.numpy()); mt, St = np_stats(xt.numpy())
    vs, vt = np.diagonal(Ss, axis1=1, axis2=2), np.diagonal(St, axis1=1, axis2=2)
    mean_part = ((ms - mt) ** 2).sum(1).mean()
    cov_part = ((np.sqrt(vs + eps) - np.sqrt(vt + eps)) ** 2).sum(1).mean()
    loss = GaussianWassersteinLoss('diag', eps=eps, mean_weight=4.)
    np.testing.assert_allclose(loss(xs, xt).item(), 4 * mean_part + cov_part, rtol=1e-12)
    # with diagonal covariances the full form is the diagonal one: channels on orthogonal, zero-mean position patterns
    H = torch.tensor([[1., 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    def maps(scales): return (scales.unsqueeze(-1) * H).reshape(len(scales), 3, 2, 2) + rnd(49, len(scales), 3, 1, 1)
    xd, yd = maps(rnd(50, 2, 3).abs() + 0.1), maps(rnd(51, 2, 3).abs() + 0.1)
    S = feature_gaussian(xd)[1]
    assert (S - torch.diag_embed(S.diagonal(dim1=1, dim2=2))).abs().max() < 1e-14
    np.testing.assert_allclose(GaussianWassersteinLoss('full', eps=eps)(xd, yd).item(),
                               GaussianWassersteinLoss('diag', eps=eps)(xd, yd).item(), rtol=1e-10)

@pytest.mark.parametrize('cov', ['diag', 'full'])
@pytest.mark.parametrize('shape', [(2, 3, 3, 3), (2, 5, 2, 2)])  # regular and rank-deficient covariances
def test_gaussian_gradcheck(cov, shape):
    xs, xt = rnd(47, *shape).requires_grad_(), rnd(48, *shape)
    assert torch.autograd.gradcheck(lambda z: GaussianWassersteinLoss(cov, eps=1e-3, mean_weight=2.)(z, xt), (xs,))

def test_gaussian_teacher_is_detached_and_positions_may_differ():
    xs, xt = torch.randn(3, 4, 5, 5, requires_grad=True), torch.randn(3, 4, 3, 3, requires_grad=True)
    GaussianWassersteinLoss('full')(xs, xt).backward()
    assert xt.grad is None and torch.isfinite(xs.grad).all()

@pytest.mark.parametrize('cov', ['diag', 'full'])
def test_gaussian_autocast_bfloat16(cov):
    xs, xt = torch.randn(4, 16, 4, 4, requires_grad=True), torch.randn(4, 16, 4, 4)  # 16 channels, 16 positions: singular
    with torch.autocast('cpu', dtype=torch.bfloat16):
        v = GaussianWassersteinLoss(cov)(xs.bfloat16(), xt.bfloat16())
    assert v.dtype == torch.float32 and torch.isfinite(v)
    v.backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0

def test_gaussian_errors():
    loss = GaussianWassersteinLoss()
    with pytest.raises(ValueError, match='connector'): loss(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match='hint_regressor'): loss(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r'\(b, c, h, w\)'): loss(torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r'\(b, c, h, w\)'): loss(torch.randn(2, 8, 4), torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match='Batch sizes differ'): loss(torch.randn(2, 8, 4, 4), torch.randn(3, 8, 4, 4))
    with pytest.raises(ValueError, match='at least 2 positions'): loss(torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1))
    GaussianWassersteinLoss(unbiased=False)(torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1))  # a 1 x 1 map: variance 0
    with pytest.raises(ValueError, match="'diag' or 'full'"): GaussianWassersteinLoss('cholesky')
    with pytest.raises(ValueError, match='>= 0'): GaussianWassersteinLoss(eps=-1)
    with pytest.raises(ValueError, match='>= 0'): GaussianWassersteinLoss(mean_weight=-1)

def test_paper_settings_use_our_parameter_names():
    "The settings dict's names are those of this module's parameters, and its values build the losses."
    s = WKD_PAPER['cifar100/resnet32x4-resnet8x4/wkd_lf']
    C = sharpen_cost(class_cost_from_weights(torch.randn(100, 8)), s['kappa'])
    WassersteinLogitLoss(C, T=s['T'], reg=s['reg'], n_iter=s['n_iter'])
    GaussianWassersteinLoss(s['cov'], eps=s['eps'], mean_weight=s['mean_weight'])
    assert WKD_PAPER['cifar100/resnet32x4-resnet8x4/wkd_l']['logit_weight'] == 600.


@pytest.mark.parametrize('with_target', [False, True])
def test_plain_domain_sweeps_equal_the_log_domain(with_target):
    "The forward pass sweeps in the plain domain when the kernel cannot underflow; value and gradient equal the log-domain sweeps."
    from otkd_nb.wkd import WassersteinLogitLoss, sharpen_cost, class_cost_from_weights, PLAIN_BELOW
    g = torch.Generator().manual_seed(3)
    C = sharpen_cost(class_cost_from_weights(torch.randn(20, 16, generator=g, dtype=torch.float64)))
    s, t = torch.randn(12, 20, generator=g, dtype=torch.float64, requires_grad=True), torch.randn(12, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 20, (12,), generator=g) if with_target else None
    L = WassersteinLogitLoss(C, T=4., reg=0.05, n_iter=10)
    assert L.plain and not WassersteinLogitLoss(C, reg=C.max().item() / PLAIN_BELOW / 2).plain
    a = L(s, t, y); ga, = torch.autograd.grad(a, s)
    L.plain = False
    b = L(s, t, y); gb, = torch.autograd.grad(b, s)
    assert abs(a.item() - b.item()) < 1e-12 and torch.allclose(ga, gb, atol=1e-12)
