"Models as people hold them, offline on the CPU: torchvision's families, fastai's vision_learner students, timm CNNs and ViTs, safetensors in and out."
import json, warnings
import pytest, torch, torchvision
from torch import nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.progress import ProgressCallback  # noqa: F401 (adds Learner.no_bar)
from torch.utils.data import TensorDataset
from otkd_nb.features import default_layers, FeatureHooks, layer_layouts, find_feature_layers
from otkd_nb.callbacks import KDCallback, IPOTCallback, FitNetCallback, SequentialWithParts
from otkd_nb.models import get_model, load_teacher, CheckpointError
from otkd_nb.hub import save_student, sidecar, timm_model

timm = pytest.importorskip('timm')
tv = torchvision.models
warnings.filterwarnings('ignore', message='.*torch.jit.script.*')


@pytest.fixture(scope='module')
def dls():
    g = torch.Generator().manual_seed(0)
    make = lambda n: TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 5)
    return DataLoaders.from_dsets(make(16), make(8), bs=8, device='cpu')


def tiny_vit(): return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)

TV = {'resnet18': lambda: tv.resnet18(num_classes=5), 'resnext50_32x4d': lambda: tv.resnext50_32x4d(num_classes=5),
      'wide_resnet50_2': lambda: tv.wide_resnet50_2(num_classes=5), 'mobilenet_v2': lambda: tv.mobilenet_v2(num_classes=5),
      'mobilenet_v3_small': lambda: tv.mobilenet_v3_small(num_classes=5), 'efficientnet_b0': lambda: tv.efficientnet_b0(num_classes=5),
      'regnet_y_400mf': lambda: tv.regnet_y_400mf(num_classes=5), 'convnext_tiny': lambda: tv.convnext_tiny(num_classes=5),
      'swin_t': lambda: tv.swin_t(num_classes=5), 'vit': tiny_vit}
TIMM = {'resnet18': {}, 'mobilenetv3_small_100': {}, 'efficientnet_b0': {}, 'vit_tiny_patch16_224': dict(img_size=32)}


def hooked(model, size=32):
    "Default layers and the shapes of their features (batch dropped) on a 2-image batch."
    model.eval(); layers = default_layers(model)
    with FeatureHooks(model, layers) as h, torch.no_grad():
        model(torch.randn(2, 3, size, size)); return layers, [tuple(f.shape[1:]) for f in h.features]


def one_step(dls, student, teacher, extra=()):
    "A KD+IPOT fit of one epoch (two batches) with the default layers; the learner and its loss terms."
    learn = Learner(dls, student, loss_func=nn.CrossEntropyLoss(), cbs=[KDCallback(teacher), IPOTCallback(teacher), *extra])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    ipot = next(c for c in learn.cbs if isinstance(c, IPOTCallback))
    assert len(ipot.history) == 2 and all(torch.isfinite(torch.tensor(ipot.history))), ipot.history
    return learn


@pytest.mark.parametrize('name', list(TV))
def test_torchvision_families_have_default_layers_and_distil(name, dls):
    m = TV[name]()
    layers, shapes = hooked(m)
    assert len(layers) >= 5 and len(set(layers)) == len(layers)
    assert all(len(s) == 3 for s in shapes[:-1]), shapes  # stages are maps (tokens and channels-last maps read as maps)
    assert len(shapes[-1]) == 1 or shapes[-1][1:] == (1, 1) or name == 'mobilenet_v2', shapes  # then the pooled vector
    spatial = [s[1] for s in shapes[:-1]]
    if name != 'vit': assert spatial == sorted(spatial, reverse=True) and spatial[0] > spatial[-1], spatial  # stages shrink
    one_step(dls, m, tv.resnet18(num_classes=5).eval())  # against a teacher of other widths: connectors are built


def test_token_features_are_read_as_maps_and_the_class_token_as_the_pooled_vector():
    v = tiny_vit()
    layers, shapes = hooked(v)
    assert layers[1:5] == [f'encoder.layers.encoder_layer_{i}' for i in range(4)] and layers[-1] == 'encoder.ln'
    assert shapes[1:5] == [(32, 4, 4)] * 4 and shapes[-1] == (32,)
    assert layer_layouts(v)['encoder.ln'] == 'token0'


@pytest.mark.parametrize('name', list(TIMM))
def test_timm_models_have_default_layers_and_distil(name, dls):
    m = timm_model('timm/' + name, num_classes=5, **TIMM[name])
    layers, shapes = hooked(m)
    assert len(layers) >= 5, layers
    if name.startswith('vit'): assert layers[-1] == 'head_drop' and shapes[1] == (192, 2, 2), (layers, shapes)
    else: assert [f['module'] for f in m.feature_info] == layers[:len(m.feature_info)]
    one_step(dls, m, tv.resnet18(num_classes=5).eval())


@pytest.mark.parametrize('pair', ['vit->cnn', 'cnn->vit'])
def test_cross_family_pairs(pair, dls):
    vit = lambda: timm_model('timm/vit_tiny_patch16_224', num_classes=5, img_size=32)
    cnn = lambda: timm_model('timm/resnet18', num_classes=5)
    student, teacher = (cnn(), vit()) if pair == 'vit->cnn' else (vit(), cnn())
    learn = one_step(dls, student, teacher.eval())
    ipot = next(c for c in learn.cbs if isinstance(c, IPOTCallback))
    assert ipot.extras is not None  # token maps and CNN maps of other widths meet through connectors


@pytest.mark.parametrize('connectors', [False, True])
def test_vision_learner_students(connectors, dls, tmp_path):
    from fastai.vision.learner import vision_learner
    from fastai.vision.models import resnet18
    teacher = (tv.resnet34(num_classes=5) if connectors else vision_learner(dls, resnet18, n_out=5, pretrained=False, loss_func=nn.CrossEntropyLoss()).model).eval()
    learn = vision_learner(dls, resnet18, n_out=5, pretrained=False, loss_func=nn.CrossEntropyLoss(), path=tmp_path,
                           cbs=[KDCallback(teacher), IPOTCallback(teacher)])
    assert (type(learn.model) is SequentialWithParts) == connectors
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    if connectors:
        opt_params = {id(p) for pl in learn.opt.param_lists for p in pl}
        assert all(id(p) in opt_params for p in learn.model.distill.parameters())  # trained by the optimizer
        learn.save('v')
        again = vision_learner(dls, resnet18, n_out=5, pretrained=False, loss_func=nn.CrossEntropyLoss(), path=tmp_path,
                               cbs=[KDCallback(teacher), IPOTCallback(teacher)]).load('v')
        for (k, a), b in zip(learn.model.state_dict().items(), again.model.state_dict().values()): assert torch.equal(a, b), k
        assert any(k.startswith('distill.') for k in again.model.state_dict())


def test_the_export_of_a_sequential_student_is_a_plain_sequential(tmp_path):
    from fastai.vision.learner import vision_learner
    from fastai.vision.models import resnet18
    from fastai.learner import load_learner
    from otkd_nb.data import write_fake_cifar100, cifar100_dls
    d = cifar100_dls(write_fake_cifar100(tmp_path, n_train=16, n_test=8), bs=8, device='cpu')
    teacher = tv.resnet34(num_classes=100).eval()
    learn = vision_learner(d, resnet18, n_out=100, pretrained=False, loss_func=nn.CrossEntropyLoss(), path=tmp_path,
                           cbs=[KDCallback(teacher), IPOTCallback(teacher)])
    learn.export(tmp_path/'s.pkl')
    m = load_learner(tmp_path/'s.pkl').model
    assert type(m) is nn.Sequential and 'distill' not in m._modules
    assert type(learn.model) is SequentialWithParts and 'distill' in learn.model._modules  # the learner trains on


def test_safetensors_round_trip_and_a_wrong_model_refused(tmp_path, dls):
    learn = one_step(dls, get_model('resnet8', num_classes=5), get_model('resnet14', num_classes=5).eval())
    f = save_student(learn, tmp_path/'s.safetensors')
    meta = json.loads(sidecar(f).read_text())
    assert meta['model'] == 'resnet8' and meta['num_classes'] == 5 and meta['method'] == 'kd+ipot' and meta['accuracy'] is None  # no accuracy metric
    back = load_teacher(f)
    own = {k: v for k, v in learn.model.state_dict().items() if not k.startswith('distill.')}
    assert back.state_dict().keys() == own.keys()
    for k, v in own.items(): assert torch.equal(v, back.state_dict()[k]), k
    with pytest.raises(CheckpointError, match=r"missing keys \['layer1\.1"):  # resnet14 has a second block per stage
        load_teacher(f, name='resnet14')
    sidecar(f).unlink()  # without the JSON, the keys still tell the model
    assert load_teacher(f).otkd_name == 'resnet8'


def test_timm_is_an_extra_with_a_clear_error(monkeypatch):
    import builtins
    from otkd_nb.hub import require_timm
    real = builtins.__import__
    monkeypatch.setattr(builtins, '__import__', lambda n, *a, **k: (_ for _ in ()).throw(ImportError(n)) if n == 'timm' else real(n, *a, **k))
    with pytest.raises(ImportError, match=r"otkd_nb\[timm\]"): require_timm()


def test_distill_command_with_timm_names(tmp_path, capsys):
    from otkd_nb.cli import distill_main
    from otkd_nb.data import write_fake_cifar100
    data = write_fake_cifar100(tmp_path, n_train=32, n_test=16)
    t = save_student(timm_model('timm/resnet18', num_classes=100), tmp_path/'teacher.safetensors')
    rc = distill_main(['--dataset', 'cifar100', '--data', str(data), '--teacher', 'timm/resnet18', '--teacher-ckpt', str(t),
                       '--student', 'timm/vit_tiny_patch16_224', '--method', 'ipot+kd', '--n-train', '32', '--n-valid', '16',
                       '--epochs', '1', '--bs', '16', '--device', 'cpu', '--out', str(tmp_path/'run')])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())
    assert m['model'] == 'timm/vit_tiny_patch16_224' and m['complete']
