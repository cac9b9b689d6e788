"""The loss each callback adds, on one training batch, recomputed independently: `ce_weight * CE + sum(weight_i * term_i)`
with every term from its published formula (the NumPy references of test_losses.py, POT for the OT values); the
validation loss is the plain task loss for every callback; and a task where distillation is what makes the difference."""
import warnings
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
import numpy as np, ot, pytest, torch, torch.nn.functional as F
from torch import nn
from fastai.learner import Learner
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import set_seed
from otkd_nb.callbacks import *
from otkd_nb.features import FeatureHooks
from test_losses import ref_kd, np_cos, ref_rkd, ref_pkt, ref_at, ref_sp, ref_cc_crd, ref_crd

def flat(f): return f.detach().double().reshape(f.shape[0], -1).numpy()
def uniform(b): return np.full(b, 1 / b)

def ref_exact(s, t): return sum(ot.emd2(uniform(len(a)), uniform(len(a)), np_cos(flat(a), flat(b))) for a, b in zip(s, t))
def ref_remd(s, t):
    tot = 0.
    for a, b in zip(s, t):
        C = np_cos(flat(a), flat(b)); tot += max(C.min(1).mean(), C.min(0).mean())
    return tot
def ref_sinkhorn(reg):
    def f(s, t):
        tot = 0.
        for a, b in zip(s, t):
            C = np_cos(flat(a), flat(b)); u = uniform(len(C))
            tot += (ot.bregman.sinkhorn_log(u, u, C, reg, numItermax=3000, stopThr=0) * C).sum()
        return tot
    return f

# Each case: the callbacks, and the reference of each one's term from (student feats, teacher feats, logits, teacher logits, callback, state before the batch).
CASES = {
    'kd': lambda t: [KDCallback(t)],
    'ipot': lambda t: [IPOTCallback(t, weight=0.37, n_iter=3000)],  # IPOT converges to exact OT
    'remd': lambda t: [REMDCallback(t, weight=0.37)],
    'exact': lambda t: [ExactOTCallback(t, weight=0.37)],
    'sinkhorn': lambda t: [SinkhornCallback(t, weight=0.37, reg=0.1, n_iter=3000)],
    'fitnet': lambda t: [FitNetCallback(t, weight=3.)],
    'rkd': lambda t: [RKDCallback(t, weight=0.7)],
    'pkt': lambda t: [PKTCallback(t, weight=300.)],
    'at': lambda t: [ATCallback(t, weight=50.)],
    'sp': lambda t: [SPCallback(t, weight=30.)],
    'cc': lambda t: [CCCallback(t, weight=0.5)],
    'crd': lambda t: [CRDCallback(t, weight=0.2, n_neg=16)],
    'fitnet+kd': lambda t: [FitNetCallback(t, weight=3.), KDCallback(t)],
    'ipot+kd': lambda t: [IPOTCallback(t, weight=0.37, n_iter=3000), KDCallback(t)],
    'ipot+crd+kd': lambda t: [IPOTCallback(t, weight=0.37, n_iter=3000), CRDCallback(t, weight=0.2, n_neg=16), KDCallback(t)],
    'wkdl': lambda t: [WKDLCallback(t, weight=5., n_iter=3000, separate_target=False)],  # converged Sinkhorn, against POT
    'wkdf': lambda t: [WKDFCallback(t, weight=0.5)],
    'wkdf+wkdl+kd': lambda t: [WKDFCallback(t, weight=0.5), WKDLCallback(t, weight=5., n_iter=3000, separate_target=False), KDCallback(t)],
}

def ref_wkdl(p, tp, W, T, reg):
    "WKD-L written out: per sample, POT's converged log-domain Sinkhorn plan from softmax(teacher/T) to softmax(student/T) under 1 - exp(-(1 - cos(w_i, w_j)))."
    W = W.detach().double().numpy(); Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    C = 1 - np.exp(-(1 - Wn @ Wn.T))
    np.fill_diagonal(C, 0)
    sm = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    a, b = sm(tp.double().numpy() / T), sm(p.double().numpy() / T)
    return np.mean([(ot.bregman.sinkhorn_log(a[i], b[i], C, reg, numItermax=3000, stopThr=0) * C).sum() for i in range(len(a))])

def ref_wkdf(s, t, mean_weight, eps=1e-5):
    "WKD-F (diagonal) written out: per sample, mean_weight ||mu_s - mu_t||^2 + ||sqrt(var_s + eps) - sqrt(var_t + eps)||^2 over positions."
    s, t = (x.detach().double().numpy().reshape(x.shape[0], x.shape[1], -1) for x in (s, t))
    m = ((s.mean(-1) - t.mean(-1)) ** 2).sum(-1)
    v = ((np.sqrt(s.var(-1, ddof=1) + eps) - np.sqrt(t.var(-1, ddof=1) + eps)) ** 2).sum(-1)
    return np.mean(mean_weight * m + v)

def reference(cb, s, t, p, tp, pre):
    "The term of callback `cb` on this batch, float64, from its published formula."
    if isinstance(cb, KDCallback): return ref_kd(p.double().numpy(), tp.double().numpy(), cb.kd.T)
    if isinstance(cb, WKDLCallback): return ref_wkdl(p, tp, cb.teacher.fc.weight, cb.T, cb.reg)
    if isinstance(cb, WKDFCallback): return ref_wkdf(s[0], t[0], cb.loss.mean_weight)
    if isinstance(cb, IPOTCallback) or isinstance(cb, ExactOTCallback): return ref_exact(s, t)
    if isinstance(cb, REMDCallback): return ref_remd(s, t)
    if isinstance(cb, SinkhornCallback): return ref_sinkhorn(0.1)(s, t)
    if isinstance(cb, FitNetCallback):
        return float(((cb.extras.regressor(s[0]).double() - t[0].double()) ** 2).mean())
    if isinstance(cb, RKDCallback): return ref_rkd(flat(s[0]), flat(t[0]), 25., 50.)
    if isinstance(cb, PKTCallback): return ref_pkt(flat(s[0]), flat(t[0]))
    if isinstance(cb, ATCallback): return sum(ref_at(a.detach().numpy(), b.detach().numpy()) for a, b in zip(s, t))
    if isinstance(cb, SPCallback): return sum(ref_sp(a.detach().numpy(), b.detach().numpy()) for a, b in zip(s, t))
    if isinstance(cb, CCCallback):
        return ref_cc_crd(*(flat(x) for x in cc_embeddings(cb.extras, s[0], t[0])))
    if isinstance(cb, CRDCallback):
        crd = cb.extras
        W = {k: v.detach().double().numpy() for k, v in crd.state_dict().items()}
        return ref_crd(W['embed_s.weight'], W['embed_s.bias'], W['embed_t.weight'], W['embed_t.bias'], pre['Ms'], pre['Mt'],
                       flat(s[0]), flat(t[0]), cb.idx.numpy(), pre['neg'].numpy(), crd.n_data, crd.T,
                       None if pre['Zs'] < 0 else pre['Zs'], None if pre['Zt'] < 0 else pre['Zt'])[0]
    raise TypeError(cb)

def cc_embeddings(e, fs, ft):
    "The CC loss's two embeddings, read from its own linear layers (the trainable part), as the benchmark's `Embed` does."
    lin = [m for m in e.modules() if isinstance(m, nn.Linear)]
    assert len(lin) == 2, e
    return lin[0](fs.reshape(len(fs), -1)), lin[1](ft.reshape(len(ft), -1))

class Before(Callback):
    "Keep what the batch's update will change: CRD's memory, normalisers and the negatives it is about to draw."
    order = 6  # after CRDCallback.before_batch has taken the index out
    def before_batch(self):
        self.pre = {}
        for cb in self.learn.cbs:
            if isinstance(cb, CRDCallback) and self.training:
                crd = cb.extras
                g = crd._generator(crd.memory_s.device); st = g.get_state()
                self.pre = dict(Ms=crd.memory_s.double().numpy().copy(), Mt=crd.memory_t.double().numpy().copy(),
                                Zs=crd.Z_s.item(), Zt=crd.Z_t.item(), neg=crd.negatives(cb.idx))
                g.set_state(st)  # the forward draws the same negatives

class Check(Callback):
    "On the first training batch: the loss the callbacks built, and the one recomputed from the formulas."
    order = 50
    def __init__(self, before): self.before, self.res = before, {}
    def after_loss(self):
        learn, cbs = self.learn, [cb for cb in self.learn.cbs if isinstance(cb, DistillCallback)]
        x, y = learn.xb[0], learn.yb[0]
        with torch.no_grad():
            terms = []
            for cb in cbs:
                hs = FeatureHooks(learn.model, cb.s_layers) if cb.uses_features else None
                ht = FeatureHooks(cb.teacher, cb.t_layers, detach=True) if cb.uses_features else None
                p, tp = learn.model(x), cb.teacher(x)
                s, t = (hs.features, ht.features) if hs else ([], [])
                if hs and isinstance(cb, OTCallback) and cb.extras is not None: s = [c(f) for c, f in zip(cb.extras, s)]
                terms.append((cb.weight, reference(cb, s, t, p, tp, self.before.pre)))
                for h in (hs, ht):
                    if h: h.remove()
            ce_w = [cb.ce_weight for cb in cbs if cb.ce_weight is not None]
            ce = F.cross_entropy(p.double(), y).item()
        self.res = dict(got=learn.loss_grad.item(), want=(ce_w[0] if ce_w else 1.) * ce + sum(w * v for w, v in terms),
                        terms=terms, ce_weight=ce_w[0] if ce_w else 1.)
        raise CancelFitException()

@pytest.fixture(scope='module')
def teacher():
    set_seed(0)
    learn = Learner(synthetic_dls(n_train=256, n_valid=64, bs=32), TinyNet(16), loss_func=nn.CrossEntropyLoss())
    learn.fit(1, 1e-2)
    return learn.model.eval()

def first_batch_loss(name, teacher, scale=1.):
    set_seed(1)
    dls = synthetic_dls(n_train=128, n_valid=64, bs=32, with_index='crd' in name)
    cbs = CASES[name](teacher)
    for cb in cbs:
        if not isinstance(cb, KDCallback): cb.weight *= scale
    learn = Learner(dls, TinyNet(16), loss_func=nn.CrossEntropyLoss(), cbs=cbs)
    before = Before(); chk = Check(before)
    learn.fit(1, 1e-2, cbs=[before, chk])
    return chk.res

@pytest.mark.parametrize('name', list(CASES))
def test_training_loss_is_the_weighted_sum_of_the_formulas(name, teacher):
    r = first_batch_loss(name, teacher)
    tol = 2e-4 if any(k in name for k in ('ipot', 'sinkhorn', 'wkdl')) else 2e-5  # float32 OT solvers against float64 POT
    assert abs(r['got'] - r['want']) < tol * max(1., abs(r['want'])), r
    assert all(v > 0 for _, v in r['terms']), r  # every term is there, and not zero
    kd = [cb for cb in CASES[name](teacher) if isinstance(cb, KDCallback)]
    if kd: assert r['ce_weight'] == (0.1 if name == 'kd' else 1.), r  # the benchmark's -r

@pytest.mark.parametrize('name', ['ipot', 'fitnet', 'crd', 'pkt'])
def test_weight_scales_its_term_exactly(name, teacher):
    a, b = first_batch_loss(name, teacher), first_batch_loss(name, teacher, scale=3.)
    (w, v), = a['terms']
    assert abs((b['got'] - a['got']) - 2 * w * v) < 1e-4 * max(1., abs(a['got'])), (a, b)

@pytest.mark.parametrize('name', list(CASES))
def test_validation_loss_is_the_task_loss(name, teacher):
    set_seed(1)
    dls = synthetic_dls(n_train=128, n_valid=64, bs=32, with_index='crd' in name)
    learn = Learner(dls, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=CASES[name](teacher))
    learn.fit(1, 1e-2)
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    got = learn.validate()[0]
    x, y = dls.valid.dataset.tensors[:2]
    with torch.no_grad(): want = F.cross_entropy(learn.model.eval()(x), y).item()
    assert abs(got - want) < 1e-5, (got, want)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in state.items())  # validation changed nothing (CRD's bank included)

def test_distillation_makes_the_difference():
    """60% of the training labels moved to the next class (so the majority label is wrong), a teacher that learned the clean
    task: the student distilled with KD learns the clean task; the same run with the KD term switched off (weight 0)
    learns the wrong one. The gap is far beyond seed noise."""
    set_seed(0)
    clean = synthetic_dls(n_train=1024, n_valid=256, bs=64, noise=1.0)
    teacher = Learner(clean, TinyNet(16), loss_func=nn.CrossEntropyLoss())
    teacher.fit(4, 1e-2)
    teacher = teacher.model.eval()
    noisy = synthetic_dls(n_train=1024, n_valid=256, bs=64, noise=1.0)
    ds = noisy.train.dataset
    g = torch.Generator().manual_seed(5)
    flip = torch.rand(len(ds), generator=g) < 0.6
    ds.tensors = (ds.tensors[0], torch.where(flip, (ds.tensors[1] + 1) % 10, ds.tensors[1]), *ds.tensors[2:])
    x, y = noisy.valid.dataset.tensors[:2]
    accs = {}
    for w in (0., 0.9):
        set_seed(1)
        learn = Learner(noisy, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=[KDCallback(teacher, weight=w, ce_weight=0.1)])
        learn.fit(4, 1e-2)
        with torch.no_grad(): accs[w] = (learn.model.eval()(x).argmax(1) == y).float().mean().item()
    with torch.no_grad(): t_acc = (teacher(x).argmax(1) == y).float().mean().item()
    assert t_acc > 0.9, t_acc
    assert accs[0.9] > 0.8 and accs[0.] < 0.5, (accs, t_acc)

def test_wkdl_target_separation(teacher):
    "With the WKD code's target separation: CE + weight * WD(without the true class) + the target term at weight 1."
    from otkd_nb.wkd import WassersteinLogitLoss, wkd_target_loss, sharpen_cost, class_cost_from_weights
    set_seed(1)
    dls = synthetic_dls(n_train=128, n_valid=64, bs=32)
    cb = WKDLCallback(teacher, weight=7.)
    learn = Learner(dls, TinyNet(16), loss_func=nn.CrossEntropyLoss(), cbs=[cb])
    res = {}
    class Chk(Callback):
        order = 50
        def after_loss(self):
            x, y = self.learn.xb[0], self.learn.yb[0]
            with torch.no_grad():
                p, tp = self.learn.model(x), teacher(x)
                wd = WassersteinLogitLoss(sharpen_cost(class_cost_from_weights(teacher.fc.weight)), T=8., reg=0.05, n_iter=10)(p, tp, y)
                res['got'], res['want'] = self.learn.loss_grad.item(), (F.cross_entropy(p, y) + 7. * wd + wkd_target_loss(p, tp, y)).item()
            raise CancelFitException()
    learn.fit(1, cbs=Chk())
    assert abs(res['got'] - res['want']) < 1e-5 * res['want'], res

def test_wkd_methods_train_with_connectors(teacher):
    "wkdf+wkdl+kd by name, a student of other widths: a 1x1 regressor is built for WKD-F and trained; every term logged and finite."
    from otkd_nb.train import method_callbacks, method_weights
    assert method_weights('wkdf+wkdl+kd') == dict(ce=1., wkdf=0.08, wkdl=600., kd=1.)
    set_seed(1)
    learn = Learner(synthetic_dls(n_train=128, n_valid=64, bs=32), TinyNet(8), loss_func=nn.CrossEntropyLoss(),
                    cbs=method_callbacks('wkdf+wkdl+kd', teacher))
    before = [p.detach().clone() for p in learn.model.distill['wkdf'].parameters()]
    learn.fit(1, 1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.distill['wkdf'].parameters()))
    for cb in learn.cbs:
        if isinstance(cb, DistillCallback): assert len(cb.history) == 4 and all(np.isfinite(cb.history)), cb

FEATURE_CASES = [n for n in CASES if '+' not in n and n not in ('kd', 'wkdl')]

@pytest.mark.parametrize('name', FEATURE_CASES)
def test_feature_terms_reach_the_student_body(name, teacher):
    "With the task loss weighted 0, the term alone gives the student's first stage a gradient: the hooks keep the student's graph."
    set_seed(1)
    dls = synthetic_dls(n_train=64, n_valid=32, bs=32, with_index=name == 'crd')
    cbs = CASES[name](teacher)
    cbs[0].ce_weight = 0.
    learn = Learner(dls, TinyNet(16), loss_func=nn.CrossEntropyLoss(), cbs=cbs)
    got = {}
    class Grad(Callback):
        order = 50
        def after_backward(self):
            got['g'] = self.learn.model.layer1[0].weight.grad.abs().sum().item()
            raise CancelFitException()
    learn.fit(1, 1e-3, cbs=Grad())
    assert got['g'] > 0, name
