"""Tests of `otkd_nb.losses` against independent re-computations of the published formulas (NumPy, explicit loops,
POT), plus invariances, zero-at-equality, gradients, autocast and error messages."""
import math
import numpy as np, ot, pytest, torch, torch.nn.functional as F
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from otkd_nb.cost import cosine_cost, clustered_features
from otkd_nb.exact import exact_ot
from otkd_nb.remd import remd
from otkd_nb.ipot import ipot, sinkhorn
from otkd_nb.losses import (KDLoss, OTLoss, OT_SOLVERS, FitNetLoss, hint_regressor, RKDLoss, PKTLoss, ATLoss,
                            attention_map, SPLoss, CCLoss, CRDLoss)

cfg = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)
scales = st.floats(1e-2, 1e2)

def rnd(seed, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)

# ---------------------------------------------------------------- independent references (NumPy, loops)

def ref_kd(s, t, T):
    s, t = np.asarray(s, float) / T, np.asarray(t, float) / T
    tot = 0.
    for i in range(len(s)):
        ps = np.exp(s[i] - s[i].max()); ps /= ps.sum()
        pt = np.exp(t[i] - t[i].max()); pt /= pt.sum()
        tot += sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(len(pt)))
    return tot / len(s) * T * T

def np_cos(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    return 1 - (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (y / np.linalg.norm(y, axis=1, keepdims=True)).T

def huber(z):
    z = abs(z)
    return 0.5 * z * z if z < 1 else z - 0.5

def ref_rkd(s, t, wd, wa):
    def rel(f):
        b = len(f)
        d = np.array([[np.linalg.norm(f[i] - f[j]) for j in range(b)] for i in range(b)])
        mu = sum(d[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        a = np.zeros((b, b, b))
        for j in range(b):
            for i in range(b):
                for k in range(b):
                    u, v = f[i] - f[j], f[k] - f[j]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    a[j, i, k] = 0. if nu == 0 or nv == 0 else u @ v / (nu * nv)
        return d / mu, a
    (ds, as_), (dt, at) = rel(np.asarray(s, float)), rel(np.asarray(t, float))
    ld = np.mean([huber(x) for x in (ds - dt).ravel()])
    la = np.mean([huber(x) for x in (as_ - at).ravel()])
    return wd * ld + wa * la

def ref_pkt(s, t, eps=1e-7):
    def probs(f):
        f = np.asarray(f, float); b = len(f)
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
        K = np.array([[(1 + f[i] @ f[j]) / 2 for j in range(b)] for i in range(b)])
        return K / K.sum(1, keepdims=True)
    ps, pt = probs(s), probs(t)
    b = len(ps)
    return sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for i in range(b) for j in range(b)) / b**2

def np_avg_pool(f, h, w):
    "Average pooling of `(b, c, H, W)` down to `(h, w)` when H, W are multiples of h, w."
    b, c, H, W = f.shape
    return f.reshape(b, c, h, H // h, w, W // w).mean((3, 5))

def ref_at(s, t, p=2):
    s, t = np.asarray(s, float), np.asarray(t, float)
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    s, t = np_avg_pool(s, h, w), np_avg_pool(t, h, w)
    def amap(f):
        out = []
        for i in range(len(f)):
            a = np.zeros(h * w)
            for u in range(h * w): a[u] = np.mean([abs(f[i, k].ravel()[u]) ** p for k in range(f.shape[1])])
            out.append(a / np.linalg.norm(a))
        return np.array(out)
    return np.mean((amap(s) - amap(t)) ** 2)

def ref_sp(s, t):
    s, t = np.asarray(s, float).reshape(len(s), -1), np.asarray(t, float).reshape(len(t), -1)
    b = len(s)
    def gram(f):
        G = np.array([[f[i] @ f[j] for j in range(b)] for i in range(b)])
        return G / np.linalg.norm(G, axis=1, keepdims=True)
    return sum((gram(t)[i, j] - gram(s)[i, j]) ** 2 for i in range(b) for j in range(b)) / b**2

def ref_cc_taylor(es, et, gamma, order):
    def K(e):
        e = np.asarray(e, float); e = e / np.linalg.norm(e, axis=1, keepdims=True); b = len(e)
        return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * (e[i] @ e[j]) ** p
                              for p in range(order + 1)) for j in range(b)] for i in range(b)])
    return np.mean((K(es) - K(et)) ** 2)

def ref_cc_crd(es, et):
    es, et = np.asarray(es, float), np.asarray(et, float)
    b, d = es.shape
    return np.mean([sum(abs(es[i, k] - et[i, k]) * abs(es[i + 1, k] - et[i + 1, k]) for k in range(d)) for i in range(b - 1)])

# ---------------------------------------------------------------- KD

@cfg
@given(seeds, st.integers(1, 6), st.integers(2, 7), st.floats(0.5, 8))
def test_kd_matches_formula(seed, b, k, T):
    s, t = 3 * rnd(seed, b, k), 3 * rnd(seed + 1, b, k)
    assert abs(KDLoss(T)(s, t).item() - ref_kd(s.numpy(), t.numpy(), T)) < 1e-9
    assert abs(KDLoss(T)(s + 2.5, s).item()) < 1e-10  # equal up to a shift: same softmax

def test_kd_grad_float32_and_errors():
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    KDLoss()(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert KDLoss()(s.bfloat16(), t.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match='same shape'): KDLoss()(torch.randn(4, 10), torch.randn(4, 9))
    with pytest.raises(ValueError, match='must be > 0'): KDLoss(T=0)

# ---------------------------------------------------------------- OTLoss

def layers(seed, b=12, widths=(3, 8, 17)):
    pairs = [clustered_features(b, d, seed=seed + i, dtype=torch.float64) for i, d in enumerate(widths)]
    return [x for x, _ in pairs], [y for _, y in pairs]

def np_ipot(C, beta, n_iter, inner=1):
    "IPOT (Xie et al. 2019, Algorithm 1) in NumPy, uniform marginals: returns <T, C>."
    n, m = C.shape
    a, b, G, T, sig = np.full(n, 1 / n), np.full(m, 1 / m), np.exp(-C / beta), np.ones((n, m)), np.full(m, 1 / m)
    for _ in range(n_iter):
        Q = G * T
        for _ in range(inner):
            delta = a / (Q @ sig)
            sig = b / (Q.T @ delta)
        T = delta[:, None] * Q * sig[None, :]
    return (T * C).sum()

def np_remd(C): return max(C.min(1).mean(), C.min(0).mean())

# Independent references of each solver's value on one cost matrix (NumPy loops, POT), at the solvers' defaults.
SOLVER_REFS = dict(ipot=lambda C: np_ipot(C, 0.05, 100), remd=np_remd,
                   exact=lambda C: ot.emd2(np.full(len(C), 1 / len(C)), np.full(C.shape[1], 1 / C.shape[1]), C),
                   sinkhorn=lambda C: np_ipot(C, 0.05, 1, inner=100))

@pytest.mark.parametrize('solver', list(OT_SOLVERS))
def test_ot_sum_of_layers_one_by_one(solver):
    xs, ys = layers(3)
    expected = sum(SOLVER_REFS[solver](np_cos(x.reshape(len(x), -1), y.reshape(len(y), -1))) for x, y in zip(xs, ys))
    got = OTLoss(solver)(xs, ys)
    assert abs(got.item() - expected) < 1e-10 * max(1., abs(expected)), (got, expected)
    assert torch.allclose(OTLoss(solver).layer_values(xs, ys).sum(), got)

@cfg
@given(seeds, st.integers(1, 10), st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_ot_exact_is_pot_emd2(seed, b, widths):
    xs = [rnd(seed + i, b, d) for i, d in enumerate(widths)]
    ys = [rnd(seed + 100 + i, b, d) for i, d in enumerate(widths)]
    u = np.full(b, 1 / b)
    expected = sum(ot.emd2(u, u, np_cos(x.numpy(), y.numpy())) for x, y in zip(xs, ys))
    assert abs(OTLoss('exact')(xs, ys).item() - expected) < 1e-9

@cfg
@given(seeds, scales, scales)
def test_ot_permutation_and_scale_invariance(seed, a, c):
    xs, ys = layers(seed % 1000)
    p = torch.randperm(12, generator=torch.Generator().manual_seed(seed))
    ref = OTLoss('exact')(xs, ys).item()
    assert abs(OTLoss('exact')([a * x for x in xs], [c * y[p] for y in ys]).item() - ref) < 1e-9

@pytest.mark.parametrize('solver', list(OT_SOLVERS))
def test_ot_zero_for_identical_features(solver):
    x = [rnd(0, 16, 128), rnd(1, 16, 4, 3, 3)]
    got = OTLoss(solver)(x, [f.clone() for f in x]).item()
    if solver == 'sinkhorn':  # entropic: its plan is blurred off the diagonal, so a small positive bias stays
        assert 0 < got < 1e-4
    else: assert abs(got) < 1e-14

@pytest.mark.parametrize('solver', list(OT_SOLVERS))
def test_ot_grads_autocast(solver):
    xs, ys = layers(5, widths=(6, 10))
    xs = [x.float().requires_grad_() for x in xs]
    ys = [y.float().requires_grad_() for y in ys]
    OTLoss(solver)(xs, ys).backward()
    for x, y in zip(xs, ys):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert y.grad is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        v = OTLoss(solver)([x.bfloat16() for x in xs], [y.bfloat16() for y in ys])
    assert v.dtype == torch.float32

def test_ot_envelope_gradient_matches_plan():
    "The student gradient is that of <P, C(x)> with the exact plan held fixed."
    x, y = rnd(0, 8, 5).requires_grad_(), rnd(1, 8, 5)
    OTLoss('exact')(x, y).backward()
    xg = x.detach().clone().requires_grad_()
    C = cosine_cost(xg, y)
    P = torch.from_numpy(ot.emd(np.full(8, 1 / 8), np.full(8, 1 / 8), C.detach().numpy()))
    (P * C).sum().backward()
    assert torch.allclose(x.grad, xg.grad, atol=1e-12)

def test_ot_errors_and_repr():
    with pytest.raises(ValueError, match="valid solvers: 'ipot', 'remd', 'exact', 'sinkhorn'"): OTLoss('emd')
    with pytest.raises(TypeError, match='beta'): OTLoss('sinkhorn', beta=0.1)
    with pytest.raises(TypeError, match=r"\['a'\] for solver 'ipot'"): OTLoss('ipot', check=False, a=None)
    xs, ys = layers(0)
    with pytest.raises(ValueError, match='3 student layers and 2 teacher layers'): OTLoss()(xs, ys[:2])
    with pytest.raises(ValueError, match=r'student batch size 12 .* teacher batch size 11'): OTLoss()(xs, [y[:11] for y in ys])
    with pytest.raises(ValueError, match='same batch size'): OTLoss()([xs[0], xs[1][:5]], [ys[0], ys[1][:5]])
    with pytest.raises(ValueError, match='Feature sizes differ'): OTLoss()(xs, ys[::-1])
    with pytest.raises(TypeError, match='one per layer'): OTLoss()([], [])
    bad = xs[0].clone(); bad[0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'): OTLoss()(bad, ys[0])
    assert torch.isnan(OTLoss(check=False)(bad, ys[0]))
    assert repr(OTLoss('ipot', beta=0.1, n_iter=20)) == "OTLoss('ipot', beta=0.1, n_iter=20)"

# ---------------------------------------------------------------- FitNet

@pytest.mark.parametrize('s_hw,t_hw', [(8, 8), (16, 8), (4, 8), (10, 8), (7, 5)])
def test_hint_regressor_shapes(s_hw, t_hw):
    r = hint_regressor((2, 3, s_hw, s_hw), (2, 5, t_hw, t_hw))
    assert r(torch.randn(2, 3, s_hw, s_hw)).shape == (2, 5, t_hw, t_hw)
    assert isinstance(r[-1], nn.ReLU) and not isinstance(hint_regressor((3, 4, 4), (5, 4, 4), relu=False)[-1], nn.ReLU)

def test_hint_regressor_rejects_unsupported():
    with pytest.raises(ValueError, match='No regressor from a 3x3 student map to a 8x8'): hint_regressor((3, 3, 3), (5, 8, 8))
    with pytest.raises(ValueError, match='same rank'): hint_regressor((2, 3, 4, 4), (2, 7))

def test_fitnet_matches_formula_with_known_regressor():
    "A 1x1 conv with known weights and an eval-mode BatchNorm at running stats (0, 1): r(x) = relu(W x + c) / sqrt(1 + 1e-5)."
    s, t = rnd(0, 3, 4, 5, 5, dtype=torch.float32), rnd(1, 3, 6, 5, 5, dtype=torch.float32)
    loss = FitNetLoss((3, 4, 5, 5), (3, 6, 5, 5)).eval()
    W, c = rnd(2, 6, 4, dtype=torch.float32), rnd(3, 6, dtype=torch.float32)
    with torch.no_grad(): loss.regressor[0].weight.copy_(W[:, :, None, None]); loss.regressor[0].bias.copy_(c)
    sn, tn, Wn, cn = (a.double().numpy() for a in (s, t, W, c))
    r = np.maximum(np.einsum('oc,bchw->bohw', Wn, sn) + cn[None, :, None, None], 0) / math.sqrt(1 + 1e-5)
    assert abs(loss(s, t).item() - np.mean((r - tn) ** 2)) < 1e-5

@cfg
@given(seeds)
def test_fitnet_identity(seed):
    s, t = rnd(seed, 4, 3, 2, 2), rnd(seed + 1, 4, 3, 2, 2)
    fit = FitNetLoss(regressor=nn.Identity())
    assert abs(fit(s, t).item() - ((s - t) ** 2).mean().item()) < 1e-12
    assert fit(t, t).item() == 0

def test_fitnet_lazy_trainable_state_dict():
    s, t = torch.randn(4, 8, 8, 8, requires_grad=True), torch.randn(4, 16, 4, 4, requires_grad=True)
    fit = FitNetLoss()
    assert fit.regressor is None and not list(fit.parameters())
    fit(s, t).backward()
    assert [p.shape for p in fit.regressor[0].parameters()] == [(16, 8, 3, 3), (16,)]
    assert all(p.grad is not None for p in fit.parameters()) and s.grad is not None and t.grad is None
    fit2 = FitNetLoss((4, 8, 8, 8), (4, 16, 4, 4))
    fit2.load_state_dict(fit.state_dict())
    fit.eval(); fit2.eval()
    assert torch.equal(fit(s, t), fit2(s, t))
    assert FitNetLoss()(rnd(0, 2, 3, 4, 4), rnd(1, 2, 3, 4, 4)).dtype == torch.float64
    with pytest.raises(ValueError, match='both'): FitNetLoss(s_shape=(4, 8, 8, 8))
    with pytest.raises(ValueError, match=r'maps the student hint'): FitNetLoss(regressor=nn.Identity())(s, t)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert FitNetLoss((4, 8, 8, 8), (4, 16, 4, 4))(s, t).dtype == torch.float32

# ---------------------------------------------------------------- RKD

@cfg
@given(seeds, st.integers(2, 6), st.integers(1, 5), st.integers(1, 5))
def test_rkd_matches_formula(seed, b, ds, dt):
    s, t = rnd(seed, b, ds), rnd(seed + 1, b, dt)
    assert abs(RKDLoss()(s, t).item() - ref_rkd(s.numpy(), t.numpy(), 25, 50)) < 1e-8
    assert abs(RKDLoss(2., 0.)(s, t).item() - ref_rkd(s.numpy(), t.numpy(), 2, 0)) < 1e-8

@cfg
@given(seeds, scales, scales, st.floats(-5, 5))
def test_rkd_invariances(seed, a, c, shift):
    s, t = rnd(seed, 8, 6), rnd(seed + 1, 8, 10)
    ref = RKDLoss()(s, t).item()
    assert abs(RKDLoss()(a * s + shift, c * t - shift).item() - ref) < 1e-8
    assert RKDLoss()(a * t + shift, t).item() < 1e-12

def test_rkd_grads_and_errors():
    s, t = torch.randn(6, 4, 2, 2, requires_grad=True), torch.randn(6, 9, requires_grad=True)
    s2 = torch.cat([s[:1], s])  # a duplicated sample: zero distance, finite gradient
    RKDLoss()(s2, torch.cat([t[:1], t])).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match='at least 2'): RKDLoss()(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(TypeError, match='one layer'): RKDLoss()([s], [t])

# ---------------------------------------------------------------- PKT

@cfg
@given(seeds, st.integers(1, 8), st.integers(1, 6), st.integers(1, 6))
def test_pkt_matches_formula(seed, b, ds, dt):
    s, t = rnd(seed, b, ds), rnd(seed + 1, b, dt)
    assert abs(PKTLoss()(s, t).item() - ref_pkt(s.numpy(), t.numpy())) < 1e-10

@cfg
@given(seeds, scales, scales)
def test_pkt_scale_invariance_and_zero(seed, a, c):
    s, t = rnd(seed, 8, 5), rnd(seed + 1, 8, 7)
    assert abs(PKTLoss(eps=0)(a * s, c * t).item() - PKTLoss(eps=0)(s, t).item()) < 1e-12  # exact without the epsilon
    # the default eps = 1e-7 added to the norms breaks it slightly for tiny features: check scales >= 1 only
    a, c = max(a, 1.), max(c, 1.)
    assert abs(PKTLoss()(a * s, c * t).item() - PKTLoss()(s, t).item()) < 1e-5 * PKTLoss()(s, t).item()
    assert abs(PKTLoss()(a * t, t).item()) < 1e-7

# ---------------------------------------------------------------- AT

@cfg
@given(seeds, st.sampled_from([(4, 4), (8, 4), (4, 8), (6, 3)]), st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 2, 3]))
def test_at_matches_formula(seed, hw, cs, ct, p):
    s, t = rnd(seed, 2, cs, hw[0], hw[0]), rnd(seed + 1, 2, ct, hw[1], hw[1])
    assert abs(ATLoss(p)(s, t).item() - ref_at(s.numpy(), t.numpy(), p)) < 1e-10

@cfg
@given(seeds, scales, scales)
def test_at_activation_scale_invariance_sum_and_zero(seed, a, c):
    gs = [rnd(seed, 3, 4, 8, 8), rnd(seed + 1, 3, 8, 4, 4)]
    gt = [rnd(seed + 2, 3, 6, 8, 8), rnd(seed + 3, 3, 5, 2, 2)]
    at = ATLoss()
    ref = at(gs, gt).item()
    assert abs(ref - sum(ref_at(s.numpy(), t.numpy()) for s, t in zip(gs, gt))) < 1e-10
    assert abs(at([a * f for f in gs], [c * f for f in gt]).item() - ref) < 1e-9
    assert at([a * f for f in gt], gt).item() < 1e-15

def test_attention_map_and_errors():
    f = rnd(0, 2, 3, 4, 4)
    a = attention_map(f)
    assert a.shape == (2, 16) and torch.allclose(a.norm(dim=1), torch.ones(2, dtype=f.dtype))
    with pytest.raises(ValueError, match=r'needs `\(b, c, h, w\)` maps'): ATLoss()(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match='2 student layers and 1 teacher'): ATLoss()([f, f], [f])

# ---------------------------------------------------------------- SP

@cfg
@given(seeds, st.integers(1, 6), st.integers(1, 3), st.integers(1, 5))
def test_sp_matches_formula(seed, b, cs, dt):
    s, t = rnd(seed, b, cs, 2, 2), rnd(seed + 1, b, dt)
    assert abs(SPLoss()(s, t).item() - ref_sp(s.numpy(), t.numpy())) < 1e-10

@cfg
@given(seeds, scales, scales)
def test_sp_scale_invariance_sum_and_zero(seed, a, c):
    s, t = [rnd(seed, 5, 4), rnd(seed + 1, 5, 3, 2, 2)], [rnd(seed + 2, 5, 9), rnd(seed + 3, 5, 6)]
    ref = SPLoss()(s, t).item()
    assert abs(ref - sum(ref_sp(x.numpy(), y.numpy()) for x, y in zip(s, t))) < 1e-10
    assert abs(SPLoss()([a * x for x in s], [c * y for y in t]).item() - ref) < 1e-9
    assert SPLoss()([a * y for y in t], t).item() < 1e-15

# ---------------------------------------------------------------- CC

@cfg
@given(seeds, st.integers(2, 6), st.floats(0.05, 2), st.integers(0, 4))
def test_cc_taylor_matches_formula(seed, b, gamma, order):
    s, t = rnd(seed, b, 4), rnd(seed + 1, b, 7)
    assert abs(CCLoss(gamma=gamma, order=order)(s, t).item() - ref_cc_taylor(s.numpy(), t.numpy(), gamma, order)) < 1e-10

def test_cc_taylor_converges_to_rbf():
    "At high order the kernel is exp(-gamma |x - y|^2) on the unit-normalised rows."
    s, t = rnd(0, 6, 5), rnd(1, 6, 8)
    def rbf(f):
        f = f.numpy() / np.linalg.norm(f.numpy(), axis=1, keepdims=True)
        return np.exp(-0.4 * ((f[:, None] - f[None]) ** 2).sum(-1))
    assert abs(CCLoss(order=25)(s, t).item() - np.mean((rbf(s) - rbf(t)) ** 2)) < 1e-12
    assert abs(CCLoss(order=2)(s, t).item() - np.mean((rbf(s) - rbf(t)) ** 2)) > 1e-6  # order 2 is only an approximation

@cfg
@given(seeds, st.integers(2, 6), st.integers(1, 5))
def test_cc_crd_form_matches_benchmark_formula(seed, b, d):
    s, t = rnd(seed, b, d), rnd(seed + 1, b, d)
    assert abs(CCLoss(form='crd')(s, t).item() - ref_cc_crd(s.numpy(), t.numpy())) < 1e-10

def test_cc_connectors_grads_and_errors():
    cc = CCLoss(12, 20, feat_dim=8)
    s, t = torch.randn(5, 12, requires_grad=True), torch.randn(5, 20, requires_grad=True)
    loss = cc(s, t)
    with torch.no_grad(): es, et = cc.embed_s(s), cc.embed_t(t)
    assert abs(loss.item() - ref_cc_taylor(es.numpy(), et.numpy(), 0.4, 2)) < 1e-6
    loss.backward()
    assert cc.embed_s.weight.grad.abs().sum() > 0 and cc.embed_t.weight.grad.abs().sum() > 0
    assert s.grad is not None and t.grad is None
    assert sorted(n for n, _ in cc.named_parameters()) == ['embed_s.bias', 'embed_s.weight', 'embed_t.bias', 'embed_t.weight']
    assert CCLoss()(t, t).item() == 0 and CCLoss(form='crd')(t, t).item() == 0
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert cc(s, t).dtype == torch.float32
    with pytest.raises(ValueError, match="valid forms"): CCLoss(form='rbf')
    with pytest.raises(ValueError, match='both'): CCLoss(s_dim=3)
    with pytest.raises(ValueError, match='elementwise'): CCLoss(form='crd')(torch.randn(4, 3), torch.randn(4, 5))

# ---------------------------------------------------------------- CRD

def ref_crd(ws, bs, wt, bt, Ms, Mt, fs, ft, idx, neg, n_data, T, Zs=None, Zt=None, eps=1e-7):
    "NumPy CRD forward: returns (loss, Z_s, Z_t, new memory_s, new memory_t) with momentum 0.5."
    def emb(W, c, f):
        v = f @ W.T + c
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    vs, vt = emb(ws, bs, fs), emb(wt, bt, ft)
    b, K = neg.shape
    cols = [np.concatenate([[idx[i]], neg[i]]) for i in range(b)]
    hs = np.array([[math.exp(Mt[j] @ vs[i] / T) for j in cols[i]] for i in range(b)])  # student anchors vs teacher memory
    ht = np.array([[math.exp(Ms[j] @ vt[i] / T) for j in cols[i]] for i in range(b)])
    Zs = hs.mean() * n_data if Zs is None else Zs
    Zt = ht.mean() * n_data if Zt is None else Zt
    def nce(h):
        tot = 0.
        for i in range(b):
            tot += math.log(h[i, 0] / (h[i, 0] + K / n_data + eps))
            tot += sum(math.log((K / n_data) / (h[i, k] + K / n_data + eps)) for k in range(1, K + 1))
        return -tot / b
    loss = nce(hs / Zs) + nce(ht / Zt)
    Ms, Mt = Ms.copy(), Mt.copy()
    for i in range(b):
        for M, v in ((Ms, vs), (Mt, vt)):
            r = 0.5 * M[idx[i]] + 0.5 * v[i]
            M[idx[i]] = r / np.linalg.norm(r)
    return loss, Zs, Zt, Ms, Mt

def test_crd_matches_formula_two_steps():
    torch.manual_seed(0)
    crd = CRDLoss(6, 10, n_data=30, feat_dim=4, n_neg=5).double()
    P = {k: v.detach().numpy().copy() for k, v in crd.state_dict().items()}
    Ms, Mt, Zs, Zt = P['memory_s'], P['memory_t'], None, None
    for step in range(2):
        fs, ft = rnd(step, 3, 6), rnd(step + 10, 3, 10)
        idx = torch.tensor([4, 17, 29]) if step == 0 else torch.tensor([17, 0, 5])
        neg = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(step))
        loss, Zs, Zt, Ms, Mt = ref_crd(P['embed_s.weight'], P['embed_s.bias'], P['embed_t.weight'], P['embed_t.bias'],
                                       Ms, Mt, fs.numpy(), ft.numpy(), idx.numpy(), neg.numpy(), 30, 0.07, Zs, Zt)
        got = crd(fs, ft, idx, neg)
        assert abs(got.item() - loss) < 1e-9 * max(1, abs(loss))
        assert abs(crd.Z_s.item() - Zs) < 1e-9 * Zs and abs(crd.Z_t.item() - Zt) < 1e-9 * Zt  # fixed after the first batch
        assert np.allclose(crd.memory_s.numpy(), Ms, atol=1e-12) and np.allclose(crd.memory_t.numpy(), Mt, atol=1e-12)

def test_crd_memory_grads_eval_and_state_dict():
    torch.manual_seed(1)
    crd = CRDLoss(8, 12, n_data=50, n_neg=7)
    assert crd.memory_s.shape == (50, 128) and crd.memory_s.abs().max() <= math.sqrt(3 / 128)
    fs, ft = torch.randn(4, 8, requires_grad=True), torch.randn(4, 12, requires_grad=True)
    idx = torch.tensor([1, 2, 3, 40])
    before = crd.memory_t.clone()
    crd(fs, ft, idx).backward()  # negatives drawn uniformly
    changed = (crd.memory_t != before).any(1).nonzero().flatten().tolist()
    assert changed == [1, 2, 3, 40]
    assert torch.allclose(crd.memory_t[idx].norm(dim=1), torch.ones(4))
    assert fs.grad.abs().sum() > 0 and ft.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crd.parameters())
    crd.eval()
    mem = crd.memory_s.clone()
    crd(fs, ft, idx)
    assert torch.equal(crd.memory_s, mem)  # eval: no memory update
    crd2 = CRDLoss(8, 12, n_data=50, n_neg=7)
    crd2.load_state_dict(crd.state_dict())
    crd2.eval()
    neg = torch.randint(0, 50, (4, 7))
    assert torch.equal(crd2(fs, ft, idx, neg), crd(fs, ft, idx, neg))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert crd(fs, ft, idx).dtype == torch.float32

def test_crd_errors():
    crd = CRDLoss(8, 12, n_data=50, n_neg=7)
    fs, ft = torch.randn(4, 8), torch.randn(4, 12)
    with pytest.raises(ValueError, match=r'drop its first column'): crd(fs, ft, torch.arange(4), torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match='one index per sample'): crd(fs, ft, torch.arange(3))
    with pytest.raises(ValueError, match='student batch size 4'): crd(fs, ft[:3], torch.arange(4))
    with pytest.raises(ValueError, match='>= 1'): CRDLoss(8, 12, n_data=0)
