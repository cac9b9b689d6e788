"""IPOT and Sinkhorn: accuracy against exact OT, finiteness in float32, gradients, errors."""
import os, numpy as np, ot, pytest, torch
from otkd_nb.cost import cosine_cost, clustered_features
from otkd_nb.exact import exact_ot
from otkd_nb.remd import remd
from otkd_nb.ipot import ipot, sinkhorn, LOG_DOMAIN_BELOW

@pytest.mark.parametrize('b', [64, 128, 256])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_defaults_within_1e3_of_exact(b, seed):
    C = cosine_cost(*clustered_features(b, 32, seed=seed))
    ex = exact_ot(C)[0]
    v = ipot(C)[0]
    assert abs(v - ex) / ex < 1e-3

@pytest.mark.parametrize('seed', [0, 1])
def test_float64_converges_to_exact(seed):
    C = cosine_cost(*clustered_features(64, 16, seed=seed, dtype=torch.float64))
    ex = exact_ot(C)[0]
    v = ipot(C, beta=0.02, n_iter=2000)[0]
    assert v.dtype == torch.float64 and abs(v - ex) / ex < 1e-6

def _hard_costs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    zx = x.clone(); zx[::7] = 0                             # zero vectors
    dup = x[torch.arange(64) % 5]                           # duplicated points
    return {'gauss4': cosine_cost(x, y), 'zeros': cosine_cost(zx, y), 'duplicates': cosine_cost(dup, dup),
            'half': cosine_cost(x.half(), y.half()), 'clustered': cosine_cost(*clustered_features(64, 32))}

@pytest.mark.parametrize('beta', [1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize('name', ['gauss4', 'zeros', 'duplicates', 'half', 'clustered'])
def test_finite_in_float32(name, beta):
    C = _hard_costs()[name]
    for n_iter in (1, 50, 500):
        v, P = ipot(C, beta=beta, n_iter=n_iter)
        assert v.dtype == torch.float32 and torch.isfinite(v).all() and torch.isfinite(P).all()
        vs, Ps = sinkhorn(C, reg=beta, n_iter=n_iter)
        assert torch.isfinite(vs).all() and torch.isfinite(Ps).all()

def test_half_input_is_upcast():
    C = torch.rand(3, 8, 8).half()
    v, P = ipot(C)
    assert v.dtype == torch.float32 and P.dtype == torch.float32

def test_automatic_domain_threshold():
    "The plain domain is used at and above the threshold, the log domain below; both give the same answer where both work."
    C = cosine_cost(*clustered_features(32, 16))
    beta = LOG_DOMAIN_BELOW[torch.float32]
    for bt in (beta, 2 * beta):
        assert torch.allclose(ipot(C, bt, 50)[0], ipot(C, bt, 50, log_domain=True)[0], rtol=1e-5)
        assert torch.allclose(ipot(C, bt, 50)[0], ipot(C, bt, 50, log_domain=False)[0])

def test_plain_domain_breaks_where_auto_does_not():
    C = _hard_costs()['gauss4']
    assert not torch.isfinite(ipot(C, 0.01, 500, log_domain=False)[0])
    assert torch.isfinite(ipot(C, 0.01, 500)[0])

def test_gradcheck_unrolled_and_remd():
    g = torch.Generator().manual_seed(1)
    for shape in [(4, 4), (2, 3, 5)]:
        C = torch.rand(*shape, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda C: ipot(C, beta=0.1, n_iter=20, unroll=True)[0], (C,))
        assert torch.autograd.gradcheck(lambda C: ipot(C, beta=0.005, n_iter=5, unroll=True)[0], (C,))  # log domain
        assert torch.autograd.gradcheck(lambda C: sinkhorn(C, reg=0.1, n_iter=20, unroll=True)[0], (C,))
        assert torch.autograd.gradcheck(remd, (C,))

def test_envelope_gradient_is_plan_and_unrolled_differs():
    C = torch.rand(6, 6, dtype=torch.float64, requires_grad=True)
    v, P = ipot(C, beta=0.2, n_iter=5)
    g_env, = torch.autograd.grad(v, C)
    assert torch.equal(g_env, P)
    vu, Pu = ipot(C, beta=0.2, n_iter=5, unroll=True)
    g_un, = torch.autograd.grad(vu, C)
    assert torch.allclose(vu, v) and not torch.allclose(g_un, g_env)

def test_sinkhorn_matches_pot_log():
    C = cosine_cost(*clustered_features(24, 8, seed=7, dtype=torch.float64))
    u = np.full(24, 1 / 24)
    for reg in (0.1, 0.5):
        P_ref = ot.bregman.sinkhorn_log(u, u, C.numpy(), reg, numItermax=2000, stopThr=0)
        v, P = sinkhorn(C, reg, 2000)
        np.testing.assert_allclose(P.numpy(), P_ref, atol=1e-10)
        sk2 = ot.bregman.sinkhorn2(u, u, C.numpy(), reg, method='sinkhorn_log', numItermax=2000, stopThr=0)
        assert abs(v.item() - float(sk2)) < 1e-9

def test_non_uniform_weights_converge():
    g = torch.Generator().manual_seed(3)
    C = torch.rand(7, 9, dtype=torch.float64, generator=g)
    a = torch.rand(7, dtype=torch.float64, generator=g) + 0.1; a /= a.sum()
    b = torch.rand(9, dtype=torch.float64, generator=g) + 0.1; b /= b.sum()
    v, P = ipot(C, beta=0.05, n_iter=3000, a=a, b=b)
    assert abs(v.item() - ot.emd2(a.numpy(), b.numpy(), C.numpy())) < 1e-6
    assert torch.allclose(P.sum(-1), a, atol=1e-6) and torch.allclose(P.sum(-2), b, atol=1e-9)

def test_in_place_loop_matches_unrolled_loop_and_pot():
    "The in-place solver (no gradient) and the out-of-place one (unroll=True) are the same iterations; both reach POT's value."
    g = torch.Generator().manual_seed(5)
    C = torch.rand(2, 3, 6, 8, dtype=torch.float64, generator=g)  # leading dims, rectangular problems
    a = torch.rand(2, 3, 6, dtype=torch.float64, generator=g) + 0.1; a /= a.sum(-1, keepdim=True)
    b = torch.rand(8, dtype=torch.float64, generator=g) + 0.1; b /= b.sum()  # broadcast over the problems
    for inner in (1, 3):
        v, P = ipot(C, beta=0.05, n_iter=1500, inner=inner, a=a, b=b)
        vu, Pu = ipot(C.clone().requires_grad_(), beta=0.05, n_iter=1500, inner=inner, a=a, b=b, unroll=True)
        assert torch.allclose(P, Pu.detach(), rtol=1e-9, atol=1e-15)
        for i in range(2):
            for j in range(3):
                ex = ot.emd2(a[i, j].numpy(), b.numpy(), C[i, j].numpy())
                assert abs(v[i, j].item() - ex) < 1e-4 * ex  # IPOT is inexact: 1500 iterations reach ~1e-4 on these small random costs

def test_batched_equals_one_by_one():
    C = torch.rand(2, 3, 10, 10)
    v, P = ipot(C)
    for i in range(2):
        for j in range(3): assert torch.allclose(v[i, j], ipot(C[i, j])[0], atol=1e-6)

def test_autocast_bfloat16_gives_float32():
    C = torch.rand(4, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        v, P = ipot(C)
    assert v.dtype == torch.float32 and torch.allclose(v, ipot(C)[0])

@pytest.mark.parametrize('f', [ipot, sinkhorn, remd, exact_ot])
@pytest.mark.parametrize('C,msg', [
    (torch.rand(5), 'rank >= 2'), (torch.rand(0, 5), 'empty'),
    (torch.tensor([[0.1, float('nan')], [0.2, 0.3]]), 'NaN or Inf'),
    (torch.tensor([[0.1, float('-inf')], [0.2, 0.3]]), 'NaN or Inf')])
def test_bad_input(f, C, msg):
    with pytest.raises(ValueError, match=msg): f(C)

@pytest.mark.parametrize('x,y,msg', [
    (torch.randn(4, 6), torch.randn(4, 7), 'Feature sizes differ'),
    (torch.randn(0, 6), torch.randn(4, 6), 'empty batch'),
    (torch.randn(6), torch.randn(4, 6), 'rank >= 2'),
    (torch.full((2, 3), float('nan')), torch.randn(2, 3), 'NaN or Inf')])
def test_cost_bad_input(x, y, msg):
    with pytest.raises(ValueError, match=msg): cosine_cost(x, y)

def test_bad_parameters():
    with pytest.raises(ValueError, match='beta'): ipot(torch.rand(3, 3), beta=-1)
    with pytest.raises(ValueError, match='n_iter'): ipot(torch.rand(3, 3), n_iter=0)
    with pytest.raises(ValueError, match='> 0'): ipot(torch.rand(3, 3), a=torch.tensor([1., 0., 0.]))

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_graph_matches_eager_without_sync():
    C = cosine_cost(*[t.cuda() for t in clustered_features(128, 32)]).expand(3, 128, 128).contiguous()
    for beta in (0.05, 0.01):  # plain and log domain
        v0, P0 = ipot(C, beta=beta, check=False, graph=False)
        ipot(C, beta=beta, check=False)  # capture
        torch.cuda.set_sync_debug_mode('error')
        try: v1, P1 = ipot(C, beta=beta, check=False); s1 = sinkhorn(C, check=False)[0]
        finally: torch.cuda.set_sync_debug_mode(0)
        assert torch.allclose(v0, v1, rtol=1e-6) and torch.allclose(P0, P1, atol=1e-7)
        v2, _ = ipot(C * 0.5, beta=beta, check=False)  # the same graph, new input
        assert torch.allclose(v2, ipot(C * 0.5, beta=beta, check=False, graph=False)[0], rtol=1e-6)

@pytest.mark.parametrize('kw', [
    dict(n_iter=1), dict(n_iter=11), dict(n_iter=23),  # no proximal step; exactly one unrolled trip; trips and a remainder
    dict(inner=3, n_iter=17),  # sweeps written out in the body
    dict(beta=0.01, n_iter=23), dict(beta=0.01, inner=2, n_iter=9),  # log domain
    dict(n_iter=3, inner=25),  # more sweeps than UNROLL: a loop of their own
])
def test_compiled_loop_matches_eager(kw):
    "compile=True runs the same iterations as the eager loop, on batched rectangular float64 problems with weights."
    g = torch.Generator().manual_seed(11)
    C = torch.rand(2, 3, 12, 9, dtype=torch.float64, generator=g)
    a = torch.rand(2, 3, 12, dtype=torch.float64, generator=g) + 0.1; a /= a.sum(-1, keepdim=True)
    b = torch.rand(9, dtype=torch.float64, generator=g) + 0.1; b /= b.sum()
    v, P = ipot(C, a=a, b=b, **kw)
    vc, Pc = ipot(C, a=a, b=b, compile=True, **kw)
    assert vc.shape == v.shape and Pc.shape == P.shape
    assert torch.allclose(Pc, P, rtol=1e-10, atol=1e-15) and torch.allclose(vc, v, rtol=1e-10)

def test_compiled_float32_and_sinkhorn():
    "The float32 default solve and Sinkhorn, compiled, against eager and (for the default) exact OT."
    C = torch.stack([cosine_cost(*clustered_features(64, 16, seed=s)) for s in range(3)])
    v, P = ipot(C, compile=True)
    assert torch.allclose(P, ipot(C)[1], atol=1e-7)
    for i in range(3): assert abs(v[i].item() - exact_ot(C[i])[0].item()) < 1e-3 * exact_ot(C[i])[0].item()
    assert torch.allclose(sinkhorn(C, compile=True)[1], sinkhorn(C)[1], atol=1e-7)

def test_compiled_errors():
    with pytest.raises(ValueError, match='unroll=True'): ipot(torch.rand(3, 3), compile=True, unroll=True)
    with pytest.raises(ValueError, match='on CUDA leave compile=False'): ipot(torch.rand(3, 3, device='meta'), compile=True, check=False)

import otkd_nb.fast as fast
from otkd_nb.fast import TRITON_MAX

def _triton_device():
    "Where `triton=True` can run here: CUDA, or the CPU under Triton's interpreter (conftest switches it on without a GPU)."
    if fast.triton is None: return None
    if torch.cuda.is_available(): return 'cuda'
    return 'cpu' if fast.interpreted() else None

needs_triton = pytest.mark.skipif(_triton_device() is None, reason='needs triton, on CUDA or in its interpreter (TRITON_INTERPRET=1)')

@needs_triton
@pytest.mark.parametrize('kw', [dict(n_iter=1), dict(n_iter=23), dict(inner=3, n_iter=7),  # plain domain
                                dict(beta=0.005, n_iter=9), dict(beta=0.005, inner=2, n_iter=5)])  # log domain (float64 below 0.01)
@pytest.mark.parametrize('n,m', [(12, 9), (1, 5), (16, 16), (33, 70)])
def test_triton_kernel_matches_eager(kw, n, m):
    "triton=True runs the eager loop's iterations: batched float64 problems, padded tiles (n, m not powers of two), weights."
    g = torch.Generator().manual_seed(n * 100 + m)
    C = torch.rand(2, 3, n, m, dtype=torch.float64, generator=g)
    a = torch.rand(2, 3, n, dtype=torch.float64, generator=g) + 0.1; a /= a.sum(-1, keepdim=True)
    b = torch.rand(m, dtype=torch.float64, generator=g) + 0.1; b /= b.sum()
    C, a, b = (t.to(_triton_device()) for t in (C, a, b))
    v, P = ipot(C, a=a, b=b, **kw)
    vt, Pt = ipot(C, a=a, b=b, triton=True, **kw)
    assert vt.shape == v.shape and Pt.shape == P.shape and vt.device == v.device
    assert torch.allclose(Pt, P, rtol=1e-10, atol=1e-15) and torch.allclose(vt, v, rtol=1e-10)

@needs_triton
def test_triton_float32_largest_tile_sinkhorn_and_gradient():
    "float32 at the largest tile and at a training batch: against eager and exact OT; Sinkhorn; the envelope gradient."
    dev = _triton_device()
    C = torch.stack([cosine_cost(*clustered_features(64, 16, seed=s)) for s in range(3)]).to(dev)
    v, P = ipot(C, triton=True)
    assert torch.allclose(P, ipot(C)[1], atol=1e-7)
    for i in range(3):
        ex = exact_ot(C[i].cpu())[0].item()
        assert abs(v[i].item() - ex) < 1e-3 * ex
    assert torch.allclose(sinkhorn(C, triton=True)[1], sinkhorn(C)[1], atol=1e-7)
    big = cosine_cost(*clustered_features(TRITON_MAX, 16, seed=5)).to(dev)
    assert torch.allclose(ipot(big, n_iter=20, triton=True)[1], ipot(big, n_iter=20)[1], atol=1e-7)
    Cg = C.clone().requires_grad_()
    vg, Pg = ipot(Cg, triton=True)
    vg.sum().backward()
    assert torch.equal(Cg.grad, Pg) and not Pg.requires_grad

@needs_triton
def test_triton_errors(monkeypatch):
    with pytest.raises(ValueError, match='cannot be combined with unroll=True'): ipot(torch.rand(3, 3), triton=True, unroll=True)
    with pytest.raises(ValueError, match='exclude each other'): ipot(torch.rand(3, 3), triton=True, compile=True)
    too_big = torch.rand(5, 129, device=_triton_device())
    with pytest.raises(ValueError, match=f'up to {TRITON_MAX} x {TRITON_MAX}; got 5 x 129'): ipot(too_big, triton=True)
    with pytest.raises(ValueError, match='runs the loop as a CUDA kernel'): ipot(torch.rand(3, 3, device='meta'), triton=True, check=False)
    monkeypatch.setattr(fast, 'triton', None)
    with pytest.raises(ValueError, match='needs the `triton` package'): ipot(torch.rand(3, 3), triton=True)

@pytest.mark.skipif(fast.triton is None, reason='needs triton')
def test_triton_interpreter_switched_too_late():
    "TRITON_INTERPRET set after triton's import but before ours: a clear error, not Triton's own about jit functions."
    import subprocess, sys
    code = ("import os, torch, triton.language\nos.environ['TRITON_INTERPRET'] = '1'\nfrom otkd_nb.ipot import ipot\nimport otkd_nb.fast\n"
            "try: ipot(torch.rand(4, 4), triton=True)\nexcept RuntimeError as e: print('error:', e)")
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert 'error: TRITON_INTERPRET changed between the import of triton and that of otkd_nb.fast' in out.stdout, out.stdout + out.stderr

def _ptxas():
    from pathlib import Path
    return fast.triton is not None and (Path(fast.triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas').exists()

@pytest.mark.skipif(not _ptxas(), reason="needs triton with its NVIDIA toolchain (ptxas)")
def test_triton_kernels_compile_for_the_gpu():
    "Both kernels compile for sm_90 (H100/H200) with Triton's own toolchain, no GPU needed: a kernel that would not compile on a GPU fails here."
    import subprocess, sys
    from pathlib import Path
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, str(root / 'tools' / 'triton_registers.py'), '--quick'], capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0 and '\n0 failed' in out.stdout, out.stdout + out.stderr
    assert out.stdout.count('| sm_90 |') == 4 and 'FAILED' not in out.stdout
