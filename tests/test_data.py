"Tests of otkd_nb.data on small files in the real formats, written here, and on the real Fashion-MNIST when installed."
import gzip, os, pickle, time
from pathlib import Path

import numpy as np, pytest, torch
import torch.nn.functional as F
from torch import nn

import otkd_nb.data as data
from otkd_nb.data import (STATS, DataNotFoundError, ArrayDataset, FolderDataset, ArrayDL, ImageDL, BatchTfm, cifar100_dls, svhn_dls, imagenet_dls,
                          fashion_mnist_dls, find_fashion_mnist, read_idx, write_idx, read_cifar100, random_crop,
                          write_fake_cifar100, write_fake_svhn, write_fake_image_folder, FASHION_MNIST_FILES)

HAS_FM = data.DEBIAN_FASHION_MNIST.is_dir() and find_fashion_mnist(data.DEBIAN_FASHION_MNIST) is not None
needs_fm = pytest.mark.skipif(not HAS_FM, reason="the real Fashion-MNIST is not installed: "
                              "apt-get install dataset-fashion-mnist (puts it in /usr/share/datasets/fashion-mnist/)")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    "No test sees the caller's OTKD_DATA or cache."
    monkeypatch.delenv('OTKD_DATA', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path/'xdg-cache'))


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    return write_fake_cifar100(tmp_path_factory.mktemp('cifar'), n_train=300, n_test=130).parent


@pytest.fixture(scope='module')
def svhn(tmp_path_factory):
    return write_fake_svhn(tmp_path_factory.mktemp('svhn'), n_train=150, n_test=70)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_fake_image_folder(tmp_path_factory.mktemp('imagenet'), n_train=5, n_val=3)


def write_fake_fashion_mnist(d, n_train=120, n_test=40, gz=True, seed=0):
    "Four IDX files as published (labels uint8), images with a per-image constant so that they can be told apart."
    rng = np.random.default_rng(seed)
    d = Path(d); d.mkdir(parents=True, exist_ok=True)
    for train, n in ((True, n_train), (False, n_test)):
        fx, fy = FASHION_MNIST_FILES[train]
        write_idx(d/(fx + '.gz' * gz), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d/(fy + '.gz' * gz), (np.arange(n) % 10).astype(np.uint8))
    return d


def unnorm(x, stats):
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in stats)
    return x*s + m


def is_shift(aug, orig, pad=4, flip=True):
    "Whether `aug` (c, h, w) is `orig` (maybe flipped) shifted by some offset within `pad`, zeros coming in."
    h, w = orig.shape[-2:]
    for o in ((orig, orig.flip(-1)) if flip else (orig,)):
        p = F.pad(o, (pad,)*4)
        for i in range(2*pad+1):
            for j in range(2*pad+1):
                if torch.allclose(p[:, i:i+h, j:j+w], aug, atol=1e-5): return True
    return False


# ---------------------------------------------------------------- CIFAR-100

def test_cifar100_batches(cifar):
    dls = cifar100_dls(cifar, device='cpu')
    x0, y0, vocab = read_cifar100(cifar/'cifar-100-python', train=False)
    xb, yb = dls.valid.one_batch()
    assert xb.shape == (64, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert dls.n_inp == 1 and dls.c == 100 and dls.vocab == vocab == [f'class{i:02d}' for i in range(100)]
    assert dls.device == torch.device('cpu') and xb.device.type == 'cpu'
    torch.testing.assert_close(unnorm(xb, STATS['cifar100']), x0[:64].float()/255, atol=1e-5, rtol=0)
    assert torch.equal(yb, y0[:64])
    assert len(dls.train) == -(-300//64) and len(dls.valid) == -(-130//64)  # train keeps its last batch of 300 % 64 = 44
    assert dls.split == 'test' and dls.names == ['train', 'test'] and len(dls.loaders) == 2


def test_cifar100_pixel_layout(tmp_path):
    "The 3072 values of a row are the red plane, then green, then blue, each row-major."
    d = write_fake_cifar100(tmp_path, n_train=2, n_test=2)
    with open(d/'test', 'rb') as f: raw = pickle.load(f, encoding='bytes')[b'data']
    x, _, _ = read_cifar100(d, train=False)
    assert x[1, 1, 2, 3] == raw[1, 1024 + 2*32 + 3] and x[0, 2, 31, 0] == raw[0, 2048 + 31*32]


def test_cifar100_str_keys(tmp_path):
    "Pickles read with str keys (as written by Python 3 with str keys) work too."
    d = tmp_path/'cifar-100-python'; d.mkdir()
    x = np.zeros((3, 3072), np.uint8)
    for n in ('train', 'test'):
        with open(d/n, 'wb') as f: pickle.dump({'data': x, 'fine_labels': [0, 1, 2]}, f)
    with open(d/'meta', 'wb') as f: pickle.dump({'fine_label_names': ['a', 'b', 'c']}, f)
    xs, ys, v = read_cifar100(d)
    assert xs.shape == (3, 3, 32, 32) and ys.tolist() == [0, 1, 2] and v == ['a', 'b', 'c']


def test_normalisation_statistics(cifar):
    "A batch of constant images, each equal to the dataset mean, normalises to zero; mean +- std to +-1."
    for stats, c in ((STATS['cifar100'], 3), (STATS['fashion_mnist'], 1)):
        m = torch.tensor(stats[0]).view(1, c, 1, 1); s = torch.tensor(stats[1]).view(1, c, 1, 1)
        x = torch.stack([(m*255).round(), ((m + s)*255).round()]).squeeze(1).expand(2, c, 8, 8).to(torch.uint8)
        out = BatchTfm(*stats)((x,))[0]
        torch.testing.assert_close(out[0], torch.zeros(c, 8, 8), atol=0.01, rtol=0)
        torch.testing.assert_close(out[1], torch.ones(c, 8, 8), atol=0.01, rtol=0)


def test_augmentation_train_only(cifar):
    dls = cifar100_dls(cifar, with_index=True, device='cpu', bs=32)
    ds = dls.train_ds
    # valid: deterministic and exactly the stored pixels
    a, b = dls.valid.one_batch(), dls.valid.one_batch()
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # train: each image is its stored image shifted (padding 4) and maybe flipped, and not all are unchanged
    x, y, idx = dls.train.one_batch()
    orig = ds.x[ds.source_idx[idx]].float()/255
    aug = unnorm(x, STATS['cifar100'])
    assert all(is_shift(aug[k], orig[k]) for k in range(8))
    assert not torch.allclose(aug, orig, atol=1e-5)
    assert (aug - orig).abs().flatten(1).amax(1).gt(1e-3).float().mean() > 0.5  # P(no crop shift and no flip) = 1/162
    # augment=False: train batches are exactly the stored pixels
    x, y, idx = cifar100_dls(cifar, with_index=True, augment=False, device='cpu').train.one_batch()
    torch.testing.assert_close(unnorm(x, STATS['cifar100']), ds.x[idx].float()/255, atol=1e-5, rtol=0)


def test_random_crop_offsets_cover_range():
    x = torch.zeros(2000, 1, 9, 9); x[:, :, 4, 4] = 1
    pos = random_crop(x, 4)[:, 0].flatten(1)
    rows, cols = pos.argmax(1)//9, pos.argmax(1) % 9
    assert pos.sum(1).eq(1).all()  # the dot always stays in the window (shift <= 4)
    assert set(rows.tolist()) == set(range(9)) and set(cols.tolist()) == set(range(9))


def test_with_index(cifar):
    dls = cifar100_dls(cifar, with_index=True, device='cpu', n_train=200, bs=50, val_bs=50)
    assert dls.n_inp == 1 and len(dls.train_ds) == 200
    seen = []
    for x, y, i in dls.train:
        assert i.dtype == torch.int64 and torch.equal(y, dls.train_ds.y[i])
        seen += i.tolist()
    assert sorted(seen) == list(range(200))  # an epoch visits each sample once (200 = 4 full batches)
    vs = torch.cat([b[2] for b in dls.valid])
    assert torch.equal(vs, torch.arange(130))
    # the index in the files
    assert torch.equal(dls.train_ds.y, dls.train_ds.y_all[dls.train_ds.source_idx])


def test_holdout_split(cifar):
    dls = cifar100_dls(cifar, split='holdout', valid_pct=0.2, seed=3, device='cpu')
    assert dls.split == 'holdout' and dls.names == ['train', 'holdout', 'test']
    assert [len(dl.dataset) for dl in dls.loaders] == [240, 60, 130]
    tr, ho = set(dls.train_ds.source_idx.tolist()), set(dls.valid_ds.source_idx.tolist())
    assert not tr & ho and tr | ho == set(range(300))
    assert dls.valid_ds.y_all is dls.train_ds.y_all  # the holdout comes from the training set
    assert dls[2].dataset.name == 'test' and len(dls[2].dataset) == 130
    # no augmentation on the holdout
    a, b = dls.valid.one_batch(), dls.valid.one_batch()
    assert torch.equal(a[0], b[0])
    again = cifar100_dls(cifar, split='holdout', valid_pct=0.2, seed=3, device='cpu')
    assert torch.equal(again.valid_ds.source_idx, dls.valid_ds.source_idx)
    other = cifar100_dls(cifar, split='holdout', valid_pct=0.2, seed=4, device='cpu')
    assert not torch.equal(other.valid_ds.source_idx, dls.valid_ds.source_idx)
    with pytest.raises(ValueError, match="'test' or 'holdout'"): cifar100_dls(cifar, split='valid', device='cpu')
    with pytest.raises(ValueError, match='valid_pct'): cifar100_dls(cifar, split='holdout', valid_pct=1.5, device='cpu')


def test_subsets(cifar):
    dls = cifar100_dls(cifar, n_train=100, n_valid=50, device='cpu', seed=7)
    assert len(dls.train_ds) == 100 and len(dls.valid_ds) == 50
    again = cifar100_dls(cifar, n_train=100, n_valid=50, device='cpu', seed=7)
    assert torch.equal(again.train_ds.source_idx, dls.train_ds.source_idx)
    assert len(cifar100_dls(cifar, n_train=10_000, device='cpu').train_ds) == 300  # more than there are: all


def test_last_partial_batch(cifar, folder):
    "The training loader keeps its last, smaller batch (as the CRD benchmark does), unless it would hold a single sample."
    def epoch(dl):
        sizes, seen = [], []
        for x, y, i in dl: sizes.append(len(x)); seen += i.tolist()
        return sizes, seen
    dl = cifar100_dls(cifar, n_train=133, bs=32, with_index=True, device='cpu').train  # 133 % 32 = 5
    sizes, seen = epoch(dl)
    assert len(dl) == -(-133//32) == 5 and not dl.drop_last
    assert sizes == [32]*4 + [5] and sorted(seen) == list(range(133))  # every sample exactly once
    dl = cifar100_dls(cifar, n_train=129, bs=32, with_index=True, device='cpu').train  # 129 % 32 = 1
    sizes, seen = epoch(dl)
    assert len(dl) == 4 and dl.drop_last and sizes == [32]*4 and len(set(seen)) == 128  # the single leftover is dropped
    assert not cifar100_dls(cifar, bs=64, device='cpu').valid.drop_last  # the other loaders never drop
    # the holdout split: decided on what the training loader holds after the split (240 % 60 = 0, 240 % 239 = 1)
    assert not cifar100_dls(cifar, split='holdout', valid_pct=0.2, bs=60, device='cpu').train.drop_last
    assert cifar100_dls(cifar, split='holdout', valid_pct=0.2, bs=239, device='cpu').train.drop_last
    # image folders too: 15 training images
    assert len(imagenet_dls(folder, bs=4, num_workers=0, device='cpu').train) == 4  # 3 batches of 4, then 3
    assert len(imagenet_dls(folder, bs=7, num_workers=0, device='cpu').train) == 2  # 15 % 7 = 1: dropped


def test_learner_fit_and_get_preds(cifar):
    "fastai's Learner trains on these loaders; with_index batches split into xb=(x,), yb=(y, idx)."
    from fastai.learner import Learner
    from fastai.callback.core import Callback
    dls = cifar100_dls(cifar, with_index=True, device='cpu', n_train=128, bs=32)

    class Spy(Callback):
        shapes = []
        def before_batch(self): self.shapes.append((len(self.xb), len(self.yb)))

    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 100))
    learn = Learner(dls, model, loss_func=lambda p, y, *idx: F.cross_entropy(p, y), cbs=Spy())
    with learn.no_logging(): learn.fit(1)
    assert learn.dls.n_inp == 1 and set(Spy.shapes) == {(1, 2)}
    assert np.isfinite(learn.recorder.values[-1][0])
    preds, (targs, idx) = learn.get_preds(ds_idx=1)  # uses dl.new(shuffle=False, drop_last=False); targets are yb = (y, idx)
    assert preds.shape == (130, 100) and torch.equal(targs, dls.valid_ds.y) and torch.equal(idx, torch.arange(130))


def test_new_keeps_transform(cifar):
    dl = cifar100_dls(cifar, device='cpu').valid
    dl2 = dl.new(shuffle=False, bs=10)
    assert type(dl2) is ArrayDL and dl2.after_batch is dl.after_batch
    torch.testing.assert_close(dl2.one_batch()[0], dl.one_batch()[0][:10])


def test_workers(cifar):
    "Batches built in worker processes equal those built in the main one."
    a = cifar100_dls(cifar, device='cpu', num_workers=2).valid
    b = cifar100_dls(cifar, device='cpu').valid
    for u, v in zip(a, b): assert torch.equal(u[0], v[0]) and torch.equal(u[1], v[1])


def test_distributed_dl(cifar, monkeypatch):
    "fastai's DistributedDL wraps these loaders (its CUDA-only broadcast replaced by identity, as with one process)."
    pytest.importorskip('accelerate', reason="fastai.distributed needs accelerate, which is not installed")
    from fastai.distributed import DistributedDL
    monkeypatch.setattr(DistributedDL, '_broadcast', lambda self, t, rank: t)
    dl = cifar100_dls(cifar, with_index=True, device='cpu').train
    ddl = DistributedDL(dl, rank=0, world_size=1)
    batches = list(ddl)  # (DistributedDL.one_batch needs an iteration first, whatever the dataset)
    assert len(batches) == len(ddl) == len(dl) and ddl.n_inp == 1
    x, y, i = batches[0]
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32)
    assert torch.equal(y, dl.dataset.y[i]) and sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(len(dl.dataset)))


def test_device_default_and_cuda(cifar):
    dls = cifar100_dls(cifar)
    from fastai.torch_core import default_device
    assert dls.device == default_device()
    if torch.cuda.is_available():
        x, y = dls.train.one_batch()
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float32


# ---------------------------------------------------------------- SVHN

def test_svhn(svhn):
    import scipy.io
    dls = svhn_dls(svhn, device='cpu', bs=32)
    X = scipy.io.loadmat(str(svhn/'test_32x32.mat'))['X']
    xb, yb = dls.valid.one_batch()
    assert xb.shape == (32, 3, 32, 32) and dls.c == 10 and dls.vocab == [str(i) for i in range(10)]
    assert yb[:11].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # stored 1..10, 10 is the digit 0
    torch.testing.assert_close(unnorm(xb, STATS['svhn']), torch.from_numpy(X[..., :32]).permute(3, 2, 0, 1).float()/255,
                               atol=1e-5, rtol=0)
    tfm = dls.train.after_batch
    assert tfm.flip is False and tfm.crop_pad == 4
    x, y, i = svhn_dls(svhn, device='cpu', with_index=True).train.one_batch()
    ds = svhn_dls(svhn, device='cpu').train_ds
    orig = ds.x[i].float()/255
    assert all(is_shift(unnorm(x, STATS['svhn'])[k], orig[k], flip=False) for k in range(6))


def test_svhn_extra(svhn, tmp_path):
    import shutil, scipy.io
    d = tmp_path/'svhn'; shutil.copytree(svhn, d)
    with pytest.raises(DataNotFoundError, match='extra_32x32.mat'): svhn_dls(d, extra=True, device='cpu')
    scipy.io.savemat(str(d/'extra_32x32.mat'), {'X': np.zeros((32, 32, 3, 20), np.uint8), 'y': np.full((20, 1), 10, np.uint8)})
    dls = svhn_dls(d, extra=True, device='cpu')
    assert len(dls.train_ds) == 170 and dls.train_ds.y[150:].eq(0).all()


# ---------------------------------------------------------------- ImageNet folders

def test_imagenet_folder(folder):
    dls = imagenet_dls(folder, bs=4, size=64, resize=72, num_workers=0, device='cpu')
    assert dls.vocab == ['n01440764', 'n01443537', 'n01484850'] and dls.c == 3 and dls.n_inp == 1
    assert len(dls.train_ds) == 15 and len(dls.valid_ds) == 9
    xb, yb = dls.train.one_batch()
    assert xb.shape == (4, 3, 64, 64) and xb.dtype == torch.float32
    assert type(dls.train) is ImageDL
    # validation: Resize + CenterCrop, deterministic; the images are flat colours, so the centre crop is that colour
    from PIL import Image
    xv, yv = dls.valid.one_batch()
    assert yv.tolist() == [0, 0, 0, 1] and torch.equal(xv, dls.valid.one_batch()[0])
    f, _ = dls.valid_ds.samples[0]
    rgb = torch.tensor(np.asarray(Image.open(f).convert('RGB'))[0, 0], dtype=torch.float32)/255
    torch.testing.assert_close(unnorm(xv, STATS['imagenet'])[0, :, 32, 32], rgb, atol=0.03, rtol=0)


def test_imagenet_index_holdout_and_labels(folder, tmp_path):
    import shutil
    dls = imagenet_dls(folder, bs=4, size=32, resize=36, num_workers=0, device='cpu', with_index=True, split='holdout', valid_pct=0.4)
    x, y, i = dls.train.one_batch()
    assert torch.equal(y, dls.train_ds.y[i]) and dls.names == ['train', 'holdout', 'test']
    assert [len(dl.dataset) for dl in dls.loaders] == [9, 6, 9]
    assert dls.valid_ds.tfm is not dls.train_ds.tfm  # the holdout uses the validation transform
    a, b = dls.valid.one_batch(), dls.valid.one_batch()
    assert torch.equal(a[0], b[0])
    # a validation folder missing a class keeps the training classes' labels
    d = tmp_path/'inet'; shutil.copytree(folder, d); shutil.rmtree(d/'val'/'n01440764')
    dv = imagenet_dls(d, num_workers=0, device='cpu')
    assert dv.valid_ds.y.tolist() == [1, 1, 1, 2, 2, 2]
    (d/'val'/'n00000001').mkdir()
    with pytest.raises(ValueError, match='n00000001'): imagenet_dls(d, num_workers=0, device='cpu')


def test_imagenet_not_found(tmp_path):
    with pytest.raises(DataNotFoundError) as e: imagenet_dls(tmp_path/'nothing', num_workers=0)
    assert 'image-net.org' in str(e.value) and 'val/<class>' in str(e.value)


# ---------------------------------------------------------------- export and predict

def tiny_net(c):
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, c))


def kind_dls(kind, request, **kw):
    "Small loaders of each kind, on CPU."
    if kind == 'cifar100': return cifar100_dls(request.getfixturevalue('cifar'), n_train=96, bs=32, device='cpu', **kw)
    if kind == 'svhn': return svhn_dls(request.getfixturevalue('svhn'), n_train=96, bs=32, device='cpu', **kw)
    if kind == 'imagenet': return imagenet_dls(request.getfixturevalue('folder'), bs=4, size=32, resize=36, num_workers=0, device='cpu', **kw)
    return fashion_mnist_dls(n_train=96, n_valid=32, bs=32, device='cpu', **kw)


def user_items(dls):
    "One test image in each form a user may hold it."
    from PIL import Image
    ds = dls.valid_ds
    if isinstance(ds, FolderDataset):
        f = ds.samples[0][0]
        return [f, Path(f), Image.open(f)]
    x = ds[0][0]  # uint8 (c, h, w), as stored
    a = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()  # (h, w) or (h, w, c)
    return [x, a, Image.fromarray(a)]


KINDS = ['cifar100', 'svhn', 'imagenet', pytest.param('fashion_mnist', marks=needs_fm)]


@pytest.mark.parametrize('kind', KINDS)
def test_export_predict(kind, request, tmp_path):
    "learn.export, load_learner, predict: the class name, its index, the probabilities, as the original learner's get_preds."
    from fastai.learner import Learner, load_learner
    from fastai.losses import CrossEntropyLossFlat
    torch.manual_seed(0)
    dls = kind_dls(kind, request)
    learn = Learner(dls, tiny_net(dls.c), loss_func=CrossEntropyLossFlat(), path=tmp_path)
    with learn.no_logging(): learn.fit(1)
    learn.export()
    assert (tmp_path/'export.pkl').stat().st_size < 100_000  # no images in it (the fake CIFAR's training images alone are 900 kB)
    probs0 = learn.get_preds(ds_idx=1)[0][0]
    with pytest.warns(UserWarning, match='pickle'): inf = load_learner(tmp_path/'export.pkl')
    assert inf.dls.vocab == dls.vocab and [len(dl.dataset) for dl in inf.dls.loaders] == [0, 0]
    assert type(inf.dls.valid) is type(dls.valid) and type(inf.dls.valid_ds) is type(dls.valid_ds)
    for item in user_items(dls):
        name, idx, probs = inf.predict(item)
        assert name in dls.vocab and name == dls.vocab[idx] and idx.ndim == 0
        assert idx == probs.argmax() and probs.shape == (dls.c,)
        torch.testing.assert_close(probs.sum(), torch.tensor(1.))
        torch.testing.assert_close(probs, probs0)  # the valid loader's transforms: same normalisation, padding, crop
    # with_input: the image decoded to [0, 1], as the model saw it (padded, channels repeated)
    x, name2, _, _ = inf.predict(user_items(dls)[0], with_input=True)
    xv = dls.valid.decode(dls.valid.one_batch())[0][0]
    assert name2 == name and x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x, xv)


@pytest.mark.parametrize('kind', KINDS)
def test_test_dl_and_new_from_items(kind, request):
    "dls.test_dl / dl.new of a list of images: an unlabelled dataset of the loader's kind, batches (x,), the valid transforms."
    dls = kind_dls(kind, request)
    items = user_items(dls)
    tdl = dls.test_dl(items)
    assert type(tdl) is type(dls.valid) and type(tdl.dataset) is type(dls.valid_ds) and tdl.dataset.y is None
    assert tdl.after_batch is dls.valid.after_batch and not tdl.shuffle and not tdl.drop_last
    (x,) = tdl.one_batch()
    xv = dls.valid.one_batch()[0][:1]
    torch.testing.assert_close(x, xv.expand(len(items), -1, -1, -1))
    dec = dls.decode_batch((x, torch.tensor([1, 0, 2])))
    assert [d[1] for d in dec] == [dls.vocab[1], dls.vocab[0], dls.vocab[2]]
    torch.testing.assert_close(dec[0][0], dls.valid.after_batch.decode(x[:1])[0])
    # new_empty: same classes, no samples
    e = dls.valid_ds.new_empty()
    assert type(e) is type(dls.valid_ds) and len(e) == 0 and e.vocab == dls.vocab


def test_items_refused(cifar, folder):
    "Images that do not fit the dataset stop with a message that says what was expected."
    ds = cifar100_dls(cifar, device='cpu').valid_ds
    x = ds[0][0]
    with pytest.raises(ValueError, match=r'\(3, 32, 32\)'): ds.test_set([x[:, :28, :28]])
    with pytest.raises(TypeError, match='uint8'): ds.test_set([x.float()])
    with pytest.raises(TypeError, match='uint8'): ds.test_set([x.permute(1, 2, 0).numpy().astype(np.float32)])
    with pytest.raises(TypeError, match='uint8'): ds.test_set([3])
    fds = imagenet_dls(folder, num_workers=0, device='cpu').valid_ds
    with pytest.raises(TypeError, match='file or a PIL image'): fds.test_set([x])
    # a grey image given to an RGB dataset is converted, as a file would be
    from PIL import Image
    g = Image.fromarray(np.full((32, 32), 7, np.uint8))
    assert ds.test_set([g]).x.shape == (1, 3, 32, 32)


def test_array_dataset_unlabelled_and_decode():
    x = torch.arange(4*3*2*2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    ds = ArrayDataset(x, None, ['a', 'b'])
    assert ds.y is None and ds.batch([2, 0])[0].equal(x[[2, 0]]) and len(ds.batch([1])) == 1 and ds[3][0].equal(x[3])
    assert ds.subset([1, 2]).batch([0])[0].equal(x[[1]])
    lab = ArrayDataset(x, torch.tensor([0, 1, 1, 0]), ['a', 'b'], with_index=True)
    d = lab.decode((x[0], torch.tensor(1), torch.tensor(3)))
    assert len(d) == 3 and torch.equal(d[0], x[0])
    assert d[1] == 'b' and d[2] == 3  # the index passes through
    assert lab.decode((x[0], 0))[1] == 'a'
    p = torch.tensor([0.2, 0.8])
    assert lab.decode((x[0], p))[1] is p  # not a class index: unchanged
    e = lab.new_empty()
    assert e.x.shape == (0, 3, 2, 2) and e.x.untyped_storage().nbytes() == 0 and e.with_index and e.vocab == ['a', 'b']


def test_batch_tfm_decode_and_pickle():
    import pickle
    tfm = BatchTfm(*STATS['cifar100'])
    x, y = tfm((torch.full((2, 3, 4, 4), 128, dtype=torch.uint8), torch.tensor([1, 2])))
    d = tfm.decode((x, y, 'rest'))
    assert isinstance(d, tuple) and d[1] is y and d[2] == 'rest'
    torch.testing.assert_close(d[0], tfm.decode(x))
    torch.testing.assert_close(d[0], torch.full_like(x, 128/255))
    assert list(tfm._dev) == [torch.device('cpu')] and '_dev' not in tfm.__getstate__()
    t2 = pickle.loads(pickle.dumps(tfm))
    assert t2._dev == {} and torch.equal(t2((torch.full((1, 3, 4, 4), 128, dtype=torch.uint8),))[0], x[:1])


def test_export_from_cuda_loaders_loads_on_cpu(cifar, tmp_path):
    "Loaders built for CUDA (pinned memory) export without touching a GPU, and load on the CPU without pinning."
    from fastai.learner import Learner, load_learner
    from fastai.losses import CrossEntropyLossFlat
    dls = cifar100_dls(cifar, n_train=64, device='cuda')  # no CUDA call until a batch is made
    assert dls.train.pin_memory and dls.device.type == 'cuda'
    dls.train.after_batch._dev[torch.device('cuda')] = 'a cache that must not be pickled'
    Learner(dls, tiny_net(dls.c), loss_func=CrossEntropyLossFlat(), path=tmp_path).export()
    with pytest.warns(UserWarning, match='pickle'): inf = load_learner(tmp_path/'export.pkl', cpu=True)
    assert inf.dls.device.type == 'cpu'
    assert all(not dl.pin_memory and not dl.fake_l.pin_memory and dl.after_batch._dev == {} for dl in inf.dls.loaders)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. PyTorch's "pin_memory ... no accelerator is found"
        name, idx, probs = inf.predict(dls.valid_ds[0][0])
    assert name == dls.vocab[idx]


# ---------------------------------------------------------------- Fashion-MNIST: formats and search order

def test_idx_roundtrip(tmp_path):
    for a in (np.arange(60, dtype=np.uint8).reshape(3, 4, 5), np.array([-1, 7], np.int32), np.array([0.5], np.float64)):
        for fn in ('a', 'a.gz'): np.testing.assert_array_equal(read_idx(write_idx(tmp_path/fn, a)), a)
    write_idx(tmp_path/'h', np.zeros((2, 3), np.uint8))
    assert (tmp_path/'h').read_bytes()[:12] == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3])
    (tmp_path/'bad').write_bytes(b'\x00\x00\x99\x01')
    with pytest.raises(ValueError, match='not an IDX'): read_idx(tmp_path/'bad')


def test_fashion_mnist_fake_layouts(tmp_path):
    "Gzipped files, plain files, and torchvision's FashionMNIST/raw/ layout are all found."
    write_fake_fashion_mnist(tmp_path/'gz')
    write_fake_fashion_mnist(tmp_path/'plain', gz=False)
    write_fake_fashion_mnist(tmp_path/'tv'/'FashionMNIST'/'raw', gz=False)
    for d in ('gz', 'plain', 'tv'):
        dls = fashion_mnist_dls(tmp_path/d, device='cpu', bs=16)
        assert len(dls.train_ds) == 120 and len(dls.valid_ds) == 40
        x, y = dls.valid.one_batch()
        assert x.shape == (16, 3, 32, 32) and y.tolist() == [i % 10 for i in range(16)]


def test_search_order(tmp_path, monkeypatch):
    "path > $OTKD_DATA/fashion_mnist > cache > Debian folder; each place told apart by its number of images."
    places = {'path': tmp_path/'given', 'env': tmp_path/'env'/'fashion_mnist',
              'cache': tmp_path/'xdg-cache'/'otkd_nb'/'fashion_mnist', 'debian': tmp_path/'debian'}
    for n, (k, d) in enumerate(places.items(), 1): write_fake_fashion_mnist(d, n_train=10*n)
    monkeypatch.setenv('OTKD_DATA', str(tmp_path/'env'))
    monkeypatch.setattr(data, 'DEBIAN_FASHION_MNIST', places['debian'])
    def n_found(**kw): return len(fashion_mnist_dls(device='cpu', bs=4, **kw).train_ds)
    assert n_found(path=places['path']) == 10
    assert n_found() == 20
    for f in places['env'].iterdir(): f.unlink()
    assert n_found() == 30
    with pytest.warns(UserWarning, match='not found under'): assert n_found(path=tmp_path/'typo') == 30
    for f in places['cache'].iterdir(): f.unlink()
    assert n_found() == 40


def test_not_found_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'DEBIAN_FASHION_MNIST', tmp_path/'no-debian')
    monkeypatch.setenv('OTKD_DATA', str(tmp_path/'env'))
    with pytest.raises(DataNotFoundError) as e: fashion_mnist_dls(tmp_path/'given', device='cpu')
    msg = str(e.value)
    order = [str(tmp_path/'given'), str(tmp_path/'env'/'fashion_mnist'), str(tmp_path/'xdg-cache'/'otkd_nb'/'fashion_mnist'),
             str(tmp_path/'no-debian'), 'download: not tried']
    pos = [msg.index(o) for o in order]
    assert pos == sorted(pos), msg
    for s in ('1. ', '5. ', 'train-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 'OTKD_DATA', 'apt-get install dataset-fashion-mnist',
              'the Debian package'):
        assert s in msg, (s, msg)
    assert isinstance(e.value, FileNotFoundError)
    monkeypatch.delenv('OTKD_DATA')
    with pytest.raises(DataNotFoundError, match='OTKD_DATA is not set'): cifar100_dls(device='cpu')


def test_download_failure_reported(tmp_path, monkeypatch):
    "With download=True and no network, the failure is caught and listed with the other places."
    import torchvision.datasets as tvd
    monkeypatch.setattr(data, 'DEBIAN_FASHION_MNIST', tmp_path/'no-debian')
    def offline(*a, **k): raise RuntimeError('Error downloading train-images-idx3-ubyte.gz: Name or service not known')
    monkeypatch.setattr(tvd, 'FashionMNIST', offline)
    monkeypatch.setattr(tvd, 'CIFAR100', offline)
    with pytest.raises(DataNotFoundError, match=r'download into .*failed \(RuntimeError: Error downloading'):
        fashion_mnist_dls(download=True, device='cpu')
    with pytest.raises(DataNotFoundError, match=r'download into .*cifar100: failed'): cifar100_dls(download=True, device='cpu')


def test_fashion_mnist_options(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    x, _ = fashion_mnist_dls(tmp_path, size=28, channels=1, device='cpu', bs=8).train.one_batch()
    assert x.shape == (8, 1, 28, 28)
    x, _ = fashion_mnist_dls(tmp_path, size=36, channels=3, device='cpu', bs=8).valid.one_batch()
    assert x.shape == (8, 3, 36, 36) and torch.equal(x[:, 0], x[:, 1])
    black = (0 - STATS['fashion_mnist'][0][0]) / STATS['fashion_mnist'][1][0]
    torch.testing.assert_close(x[:, :, :4], torch.full_like(x[:, :, :4], black))  # centred padding
    with pytest.raises(ValueError, match='channels'): fashion_mnist_dls(tmp_path, channels=2)
    with pytest.raises(ValueError, match='size'): fashion_mnist_dls(tmp_path, size=20)


# ---------------------------------------------------------------- the real Fashion-MNIST

@needs_fm
def test_real_fashion_mnist():
    dls = fashion_mnist_dls(device='cpu', val_bs=2500)
    assert len(dls.train_ds) == 60_000 and len(dls.valid_ds) == 10_000
    assert dls.train_ds.y.bincount().tolist() == [6000]*10 and dls.valid_ds.y.bincount().tolist() == [1000]*10
    assert dls.vocab[0] == 'T-shirt/top' and dls.vocab[9] == 'Ankle boot'
    x, y = dls.train.one_batch()
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x28, _ = fashion_mnist_dls(device='cpu', size=28, channels=1, val_bs=2500).valid.one_batch()
    assert x28.shape == (2500, 1, 28, 28)
    assert abs(x28.mean().item()) < 0.05 and abs(x28.std().item() - 1) < 0.05


@needs_fm
def test_real_fashion_mnist_epoch():
    "One augmented epoch of the 60,000 images: every image once, 937 batches of 64 and the last 32."
    dl = fashion_mnist_dls(device='cpu').train
    seen = torch.cat([b[1] for b in dl])
    assert len(seen) == 60_000 and len(dl) == 938
    assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(dl.dataset.y, minlength=10))


@needs_fm
def test_real_fashion_mnist_trains():
    "A small CNN learns from 1,024 real images through a fastai Learner (chance is 10%)."
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    torch.manual_seed(0)
    dls = fashion_mnist_dls(device='cpu', n_train=1024, n_valid=512, bs=64, val_bs=256, size=28, channels=1, augment=False)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8*13*13, 10))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_logging(): learn.fit(2, 3e-3)
    assert learn.recorder.values[-1][2] > 0.5  # about 0.75 seen
