"""Faithful to the CRD benchmark and to fastai: the weights of KD alone and combined, CRD's class-aware negatives and its
memory bank under several processes, every kind of DataLoaders, the last partial batch, and `learn.export` of a distilled learner."""
import warnings
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
import math, os, sys, subprocess, textwrap, pytest, torch, numpy as np
import torch.nn.functional as F, torch.utils.data as tud
from torch import nn
from scipy import stats
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader as FastaiDL
from fastai.torch_core import set_seed
from otkd_nb.callbacks import *
from otkd_nb.losses import CRDLoss, class_index, other_class_negatives
from otkd_nb.features import FeatureHooks
from otkd_nb.train import method_callbacks, method_weights, kd_weights, RECIPES

@pytest.fixture(scope='module')
def teacher():
    set_seed(0)
    learn = Learner(synthetic_dls(n_train=512, n_valid=64, bs=32, noise=0.7), TinyNet(16), loss_func=nn.CrossEntropyLoss())
    learn.fit(2, 1e-2)
    return learn.model.eval()

def kd_ref(p, tp, T=4.):
    "Hinton's KD, written out: T^2 KL(softmax(t/T) || softmax(s/T)), batch mean."
    q = F.softmax(tp / T, 1)
    return (q * (q.log() - F.log_softmax(p / T, 1))).sum(1).mean() * T * T

class FirstLoss(Callback):
    "Recompute the loss of the first training batch independently, then stop."
    order = 50
    def __init__(self, want): self.want, self.res = want, {}
    def after_loss(self):
        self.res['got'], self.res['want'] = self.learn.loss_grad.item(), self.want(self.learn).item()
        raise CancelFitException()

def first_loss(dls, cbs, want, w=8):
    set_seed(1)
    learn = Learner(dls, TinyNet(w), loss_func=nn.CrossEntropyLoss(), cbs=cbs)
    chk = FirstLoss(want)
    learn.fit(1, cbs=chk)
    return chk.res

# ---------------------------------------------------------------- 1. the weights of KD alone and combined

def test_kd_alone_is_point1_ce_point9_kd(teacher):
    dls = synthetic_dls(n_train=128, n_valid=32, bs=32)
    def want(learn):
        with torch.no_grad():
            x, y = learn.xb[0], learn.yb[0]; p, tp = learn.model(x), teacher(x)
            return 0.1 * F.cross_entropy(p, y) + 0.9 * kd_ref(p, tp)
    r = first_loss(dls, [KDCallback(teacher)], want)
    assert abs(r['got'] - r['want']) < 1e-5 * abs(r['want']), r

def test_x_plus_kd_is_ce_plus_kd_plus_beta_x(teacher):
    "FitNet+KD on one batch: CE + KD + 100 MSE(regressor(student hint), teacher hint), the benchmark's -r 1 -a 1 -b 100."
    dls = synthetic_dls(n_train=128, n_valid=32, bs=32)
    cbs = method_callbacks('fitnet+kd', teacher, RECIPES['cifar100'])
    fit = cbs[0]
    def want(learn):
        m = learn.model
        with torch.no_grad(), FeatureHooks(m, fit.s_layers) as hs, FeatureHooks(teacher, fit.t_layers) as ht:
            x, y = learn.xb[0], learn.yb[0]; p, tp = m(x), teacher(x)
            mse = ((m.distill[fit.name].regressor(hs.features[0]) - ht.features[0]) ** 2).mean()
            return F.cross_entropy(p, y) + kd_ref(p, tp) + 100 * mse
    r = first_loss(dls, cbs, want)
    assert abs(r['got'] - r['want']) < 1e-5 * abs(r['want']), r

def test_combination_weights_table():
    assert kd_weights('kd') == (0.1, 0.9) and kd_weights('crd+kd') == (1., 1.) and kd_weights('ipot+crd+kd') == (1., 1.)
    assert kd_weights('kd', RECIPES['imagenet']) == (0.5, 0.5)
    for m in ('fitnet+kd', 'rkd+kd', 'pkt+kd', 'crd+kd', 'remd+kd', 'ipot+kd', 'ipot+crd+kd'):
        w = method_weights(m); assert (w['ce'], w['kd']) == (1., 1.), (m, w)
    assert method_weights('ipot+crd') == dict(ce=1., ipot=1., crd=0.8)
    assert method_weights('ipot+kd', options={'kd': {'ce_weight': 0.3}})['ce'] == 0.3

def test_kd_auto_weights_follow_the_other_callbacks(teacher):
    dls = synthetic_dls(n_train=64, n_valid=32, bs=32)
    kd = KDCallback(teacher)
    learn = Learner(dls, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=[kd])
    learn.fit(1); assert (kd.ce_weight, kd.weight) == (0.1, 0.9)
    learn.add_cb(IPOTCallback(teacher)); learn.fit(1)  # the same KD callback, now in a combination
    assert (kd.ce_weight, kd.weight) == (1., 1.)
    kd2 = KDCallback(teacher, weight=0.5, ce_weight=0.2)
    Learner(dls, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=[kd2, IPOTCallback(teacher)]).fit(1)
    assert (kd2.ce_weight, kd2.weight) == (0.2, 0.5)

# ---------------------------------------------------------------- 2. CRD's negatives from the other classes

def test_negatives_never_share_the_anchor_class_and_are_uniform():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (300,), generator=g)
    order, start, count = class_index(labels)
    anchors = torch.arange(300)
    neg = other_class_negatives(labels[anchors], order, start, count, 4000, torch.Generator().manual_seed(1))
    assert neg.shape == (300, 4000)
    assert not (labels[neg] == labels[anchors][:, None]).any()  # 1.2 million draws, none of the anchor's class
    for c in range(7):  # per class: uniform over the samples of the other classes (chi-square, fixed seed)
        rows = neg[labels == c].reshape(-1)
        others = (labels != c).nonzero().flatten()
        counts = torch.bincount(rows, minlength=300)[others].numpy()
        assert counts.min() > 0
        assert stats.chisquare(counts).pvalue > 1e-3, c

def test_crd_loss_with_labels_equals_the_formula_on_those_negatives():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (60,))
    a = CRDLoss(6, 10, n_data=60, feat_dim=4, n_neg=9, labels=labels).double()
    b = CRDLoss(6, 10, n_data=60, feat_dim=4, n_neg=9).double()
    b.load_state_dict(a.state_dict())
    fs, ft, idx = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64), torch.randperm(60)[:8]
    state = a._generator(idx.device).get_state()
    neg = a.negatives(idx)
    assert not (labels[neg] == labels[idx][:, None]).any()
    a._gen.set_state(state)  # the same draw again, inside forward
    got, want = a(fs, ft, idx), b(fs, ft, idx, neg)
    assert torch.equal(got, want) and torch.equal(a.memory_s, b.memory_s)

def test_crd_labels_validated():
    with pytest.raises(ValueError, match='single class'): CRDLoss(4, 4, 10, labels=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match='each of the 10'): CRDLoss(4, 4, 10, labels=torch.arange(9))

def test_crd_callback_uses_class_negatives_when_labels_known(teacher):
    dls = synthetic_dls(n_train=96, n_valid=32, bs=32, with_index=True)
    learn = Learner(dls, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=[CRDCallback(teacher, n_neg=32)])
    crd = learn.model.distill['crd']
    assert torch.equal(crd.labels, dls.train.dataset.tensors[1])
    learn = Learner(dls, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=[CRDCallback(teacher, n_neg=32, negatives='uniform')])
    assert learn.model.distill['crd'].labels is None

def test_crd_callback_warns_when_labels_unknown(teacher):
    d = synthetic_dls(n_train=96, n_valid=32, bs=32, with_index=True)
    triples = lambda ds: [tuple(t[i] for t in ds.tensors) for i in range(len(ds))]  # a list: no labels to read
    dls = DataLoaders(FastaiDL(triples(d.train.dataset), bs=32, shuffle=True), FastaiDL(triples(d.valid.dataset), bs=32))
    with pytest.warns(UserWarning, match='drawn uniformly'):
        learn = Learner(dls, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=[CRDCallback(teacher, n_neg=32)])
    assert learn.model.distill['crd'].labels is None

def test_crd_validation_loss_is_task_loss(teacher):
    dls = synthetic_dls(n_train=96, n_valid=64, bs=32, with_index=True)
    learn = Learner(dls, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=[KDCallback(teacher), CRDCallback(teacher, n_neg=32)])
    learn.fit(1, 1e-2)
    bank = learn.model.distill['crd'].memory_s.clone()
    v = learn.validate()[0]
    x, y = dls.valid.dataset.tensors[:2]
    with torch.no_grad(): plain = F.cross_entropy(learn.model.eval()(x), y).item()
    assert abs(v - plain) < 1e-5 and torch.equal(bank, learn.model.distill['crd'].memory_s)  # no term, no update

# ---------------------------------------------------------------- 3. the memory bank under two processes

DDP_SCRIPT = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from otkd_nb.losses import CRDLoss
    rank, world, out = int(sys.argv[1]), 2, sys.argv[2]
    dist.init_process_group('gloo', init_method='file://' + os.path.join(out, 'store'), rank=rank, world_size=world)
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (40,))
    crd = CRDLoss(6, 10, n_data=40, feat_dim=8, n_neg=5, labels=labels)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        sizes = (5, 3) if step == 3 else (6, 6)  # a last, uneven batch
        idx = torch.randperm(40, generator=g)[:sum(sizes)]
        fs, ft = torch.randn(sum(sizes), 6, generator=g), torch.randn(sum(sizes), 10, generator=g)
        lo = sum(sizes[:rank]); hi = lo + sizes[rank]
        crd(fs[lo:hi], ft[lo:hi], idx[lo:hi])
    torch.save({k: v for k, v in crd.state_dict().items()}, os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()
''')

def test_memory_bank_identical_across_two_processes(tmp_path):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()): pytest.skip('torch.distributed with gloo is not available')
    script = tmp_path / 'ddp_crd.py'; script.write_text(DDP_SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    ps = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path)], env=env, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in ps:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    a, b = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    for k in ('memory_s', 'memory_t', 'Z_s', 'Z_t'): assert torch.equal(a[k], b[k]), k
    # one process fed the same global batches
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (40,))
    one = CRDLoss(6, 10, n_data=40, feat_dim=8, n_neg=5, labels=labels)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        n = 8 if step == 3 else 12
        idx = torch.randperm(40, generator=g)[:n]
        one(torch.randn(n, 6, generator=g), torch.randn(n, 10, generator=g), idx)
    for k in ('memory_s', 'memory_t'): assert torch.allclose(one.state_dict()[k], a[k], atol=1e-6), k
    # (the normalisers Z depend on the negatives drawn, which differ between one process and two: equal across ranks is the claim)
    changed = (a['memory_s'] != CRDLoss(6, 10, n_data=40, feat_dim=8, n_neg=5).memory_s).any(1).sum()
    assert changed > 12  # rows of both processes' samples moved

# ---------------------------------------------------------------- 4. every kind of DataLoaders

def loaders(kind, with_index):
    d = synthetic_dls(n_train=160, n_valid=64, bs=32, with_index=with_index)
    tr, va = d.train.dataset, d.valid.dataset
    if kind == 'tfmd': return d
    if kind == 'fastai-list':
        items = lambda ds: [tuple(t[i] for t in ds.tensors) for i in range(len(ds))]
        return DataLoaders(FastaiDL(items(tr), bs=32, shuffle=True), FastaiDL(items(va), bs=32))
    return DataLoaders(tud.DataLoader(tr, batch_size=32, shuffle=True), tud.DataLoader(va, batch_size=32))

METHODS = {'ipot+kd': (lambda t: [KDCallback(t), IPOTCallback(t)], False),
           'fitnet+kd': (lambda t: [KDCallback(t), FitNetCallback(t)], False),
           'crd+kd': (lambda t: [KDCallback(t), CRDCallback(t, n_neg=64)], True)}

@pytest.mark.parametrize('kind', ['tfmd', 'fastai-list', 'torch'])
@pytest.mark.parametrize('method', list(METHODS))
def test_every_kind_of_dataloaders(kind, method, teacher):
    make, wi = METHODS[method]
    set_seed(2)
    learn = Learner(loaders(kind, wi), TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=make(teacher))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # the list of triples has no labels: CRD warns and draws uniformly
        learn.fit(1, 1e-2)
    for cb in learn.cbs:
        if isinstance(cb, DistillCallback):
            assert len(cb.history) == len(learn.dls.train) and all(math.isfinite(v) for v in cb.history), (kind, method, cb)
    if method == 'fitnet+kd': assert 'fit_net' in learn.model.distill  # the regressor was built

class Seen(Callback):
    order = 0
    def before_fit(self): self.batches = []
    def before_batch(self):
        if self.training: self.batches.append(tuple(o.clone() for o in (*self.learn.xb, *self.learn.yb)))

@pytest.mark.parametrize('method', ['ipot+kd', 'fitnet+kd', 'crd+kd'])
def test_same_batches_with_and_without_distillation(method, tmp_path):
    "Augmented CIFAR-format batches at one seed: a run with the method's callbacks sees exactly the batches of the run without them."
    from otkd_nb.data import write_fake_cifar100, cifar100_dls
    from otkd_nb.models import get_model
    write_fake_cifar100(tmp_path, n_train=96, n_test=32)
    teacher = get_model('resnet14', num_classes=100)
    runs = []
    for cbs in ([], method_callbacks(method, teacher, options={'crd': {'n_neg': 256}} if 'crd' in method else None)):
        set_seed(3)
        dls = cifar100_dls(tmp_path, bs=32, with_index='crd' in method, device='cpu')
        learn = Learner(dls, get_model('resnet8', num_classes=100), loss_func=nn.CrossEntropyLoss(), cbs=cbs)
        if 'crd' in method and not cbs: learn.add_cb(_DropIndex())
        s = Seen(); learn.fit(2, 1e-3, cbs=s); runs.append(s.batches)
    a, b = runs
    assert len(a) == len(b) == 2 * len(dls.train)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x[:2], y[:2]))

class _DropIndex(Callback):
    "For the run without CRD: take the index out of the batch, as CRDCallback does."
    order = -1
    def before_batch(self): self.learn.yb = self.learn.yb[:1]

# ---------------------------------------------------------------- 5. the last partial batch

@pytest.mark.parametrize('n_last', [1, 3])
def test_last_partial_batch(n_last, teacher):
    "A last batch of one skips the relational terms (recorded); a last batch of three computes every term."
    d = synthetic_dls(n_train=64 + n_last, n_valid=32, bs=32, with_index=True)
    dls = DataLoaders(tud.DataLoader(d.train.dataset, batch_size=32, shuffle=True), tud.DataLoader(d.valid.dataset, batch_size=32))
    cbs = [KDCallback(teacher), IPOTCallback(teacher, weight=0.5), RKDCallback(teacher, weight=0.1), PKTCallback(teacher, weight=100.),
           SPCallback(teacher, weight=10.), FitNetCallback(teacher, weight=1.), ATCallback(teacher, weight=10.), CRDCallback(teacher, n_neg=16, weight=0.1)]
    learn = Learner(dls, TinyNet(8), loss_func=nn.CrossEntropyLoss(), cbs=cbs)
    learn.fit(1, 1e-2)
    assert all(math.isfinite(float(l)) for l in learn.recorder.losses)
    for cb in cbs:
        relational = cb.min_batch > 1
        if n_last == 1 and relational:
            assert cb.skipped == [(0, 2, 'batch of 1 < 2')] and math.isnan(cb.history[-1]), cb
        else:
            assert cb.skipped == [] and all(math.isfinite(v) for v in cb.history), cb
    assert {type(cb).__name__ for cb in cbs if cb.min_batch > 1} == {'IPOTCallback', 'RKDCallback', 'PKTCallback', 'SPCallback'}

# ---------------------------------------------------------------- 6. learn.export of a distilled learner

def test_export_of_a_distilled_learner_holds_the_student_alone(tmp_path):
    from otkd_nb.data import write_fake_cifar100, cifar100_dls
    from otkd_nb.models import get_model
    write_fake_cifar100(tmp_path/'data', n_train=64, n_test=16)
    dls = cifar100_dls(tmp_path/'data', bs=16, with_index=True, device='cpu')
    teacher = get_model('resnet32x4', num_classes=100)
    set_seed(0)
    plain = Learner(dls, get_model('resnet8x4', num_classes=100), loss_func=CrossEntropyLossFlat(), path=tmp_path)
    plain.export('plain.pkl')
    set_seed(0)
    learn = Learner(dls, get_model('resnet8x4', num_classes=100), loss_func=CrossEntropyLossFlat(), path=tmp_path,
                    cbs=method_callbacks('ipot+crd+kd', teacher, options={'crd': {'n_neg': 64}}))
    learn.fit(1, 1e-3)
    learn.export('student.pkl')
    size, ref = (tmp_path/'student.pkl').stat().st_size, (tmp_path/'plain.pkl').stat().st_size
    assert abs(size - ref) < 0.05 * ref, (size, ref)  # resnet32x4 is ~7.4M parameters, resnet8x4 ~1.2M: no teacher inside
    served = load_learner(tmp_path/'student.pkl')
    assert not any(isinstance(cb, DistillCallback) for cb in served.cbs) and 'distill' not in served.model._modules
    x = dls.valid.dataset[0][0]
    name, i, probs = served.predict(x)
    assert name in dls.train.dataset.vocab and int(i) == int(probs.argmax()) and abs(float(probs.sum()) - 1) < 1e-5
    # the distilled learner itself is untouched and trains on
    assert sum(isinstance(cb, DistillCallback) for cb in learn.cbs) == 3 and 'distill' in learn.model._modules
    learn.fit(1, 1e-3)
    assert len(learn.ipot.history) == 2 * len(dls.train)
