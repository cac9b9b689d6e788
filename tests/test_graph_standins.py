"""What CI cannot run on a GPU, run on the CPU with stand-ins: the CUDA-graph bookkeeping of `ipot` (`otkd_nb.fast.graph_solve`) (capture once per
problem signature, copy new inputs into the static buffers, replay, return a copy, evict the oldest) and the automatic
choice of the log domain, observed rather than inferred from the values."""
import contextlib, pytest, torch
import otkd_nb.fast as fast
from otkd_nb.ipot import ipot, sinkhorn, LOG_DOMAIN_BELOW
from otkd_nb.cost import cosine_cost, clustered_features

class Graph:
    "CPU stand-in for `torch.cuda.CUDAGraph`: what was run during capture is re-run by `replay`, writing into the captured output."
    captures, capturing = 0, None
    def __init__(self): self.calls = []
    def replay(self):
        for f, args, out in self.calls: out.copy_(f(*args))

@pytest.fixture
def standins(monkeypatch):
    "Replace the CUDA parts of `torch.cuda` that `graph_solve` uses, and record the solves run under capture."
    @contextlib.contextmanager
    def graph(g):
        Graph.captures += 1; Graph.capturing = g
        try: yield
        finally: Graph.capturing = None
    monkeypatch.setattr(torch.cuda, 'CUDAGraph', Graph)
    monkeypatch.setattr(torch.cuda, 'graph', graph)
    stream = type('Stream', (), {'wait_stream': lambda self, s: None})
    monkeypatch.setattr(torch.cuda, 'Stream', lambda device=None: stream())
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: stream())
    monkeypatch.setattr(torch.cuda, 'stream', lambda s: contextlib.nullcontext())
    for name in ('ipot_inplace', 'ipot_log'):
        f = getattr(fast, name)
        def spy(*args, _f=f):
            out = _f(*args)
            if Graph.capturing is not None: Graph.capturing.calls.append((_f, args, out))
            return out
        monkeypatch.setattr(fast, name, spy)
    fast.GRAPHS.clear(); Graph.captures = 0
    yield
    fast.GRAPHS.clear()

@pytest.mark.parametrize('beta', [0.05, 0.01])  # plain and log domain
def test_graph_replay_equals_eager(standins, beta):
    C = cosine_cost(*clustered_features(24, 8, seed=1)).expand(3, 24, 24).contiguous()
    v0, P0 = ipot(C, beta=beta, graph=False)
    v1, P1 = ipot(C, beta=beta, graph=True)  # capture, then replay
    assert Graph.captures == 1 and torch.allclose(v0, v1) and torch.allclose(P0, P1)
    C2 = cosine_cost(*clustered_features(24, 8, seed=2)).expand(3, 24, 24).contiguous()
    v2, P2 = ipot(C2, beta=beta, graph=True)  # same signature: replayed with the new input copied in
    assert Graph.captures == 1
    assert torch.allclose(v2, ipot(C2, beta=beta, graph=False)[0]) and not torch.allclose(v2, v1)
    assert torch.allclose(P1, P0)  # the first result is a copy: the replay did not overwrite it
    ipot(C[:2], beta=beta, graph=True)  # another shape: another capture
    assert Graph.captures == 2

def test_graph_cache_is_bounded(standins):
    for n in range(2, 20): ipot(torch.rand(n, n), graph=True)
    assert len(fast.GRAPHS) == 16 and Graph.captures == 18
    sinkhorn(torch.rand(5, 5), graph=True)  # sinkhorn goes through the same machinery
    assert Graph.captures == 19

def test_log_domain_chosen_below_the_threshold(monkeypatch):
    "The solver actually run: the log domain below LOG_DOMAIN_BELOW[dtype], the plain one at and above it."
    used = []
    for name in ('ipot_inplace', 'ipot_log'):
        f = getattr(fast, name)
        monkeypatch.setattr(fast, name, lambda *a, _f=f, _n=name: used.append(_n) or _f(*a))
    for dtype, thr in LOG_DOMAIN_BELOW.items():
        C = cosine_cost(*clustered_features(16, 8, dtype=dtype))
        for beta, want in ((thr / 2, 'ipot_log'), (thr, 'ipot_inplace'), (2 * thr, 'ipot_inplace')):
            used.clear(); ipot(C, beta=beta, n_iter=5)
            assert used == [want], (dtype, beta, used)

def test_automatic_log_domain_where_the_plain_one_underflows():
    "At beta = 0.01 in float32 the plain loop's kernel exp(-C/beta) underflows to 0 and gives NaN; the automatic choice does not."
    from otkd_nb.exact import exact_ot
    C = 1.5 + 0.5 * torch.rand(8, 8, generator=torch.Generator().manual_seed(0))  # costs >= 1.5: exp(-150) is 0 in float32
    assert torch.exp(-C / 0.01).max() == 0
    bad, _ = ipot(C, beta=0.01, n_iter=200, log_domain=False)
    good, P = ipot(C, beta=0.01, n_iter=200)
    assert not torch.isfinite(bad) and abs(good.item() - exact_ot(C.double())[0].item()) < 1e-4
