"""The model zoo against the CRD benchmark's specification (tests/specs/cifar_zoo.json), torchvision's ResNets,
and `load_teacher`: checkpoint layouts, devices, model names, errors, and refusing files that need a full unpickle."""
import json, pickle, urllib.error, zipfile
from functools import lru_cache
from pathlib import Path
import pytest, torch, torchvision
from torch import nn
from otkd_nb.models import (CIFAR_MODELS, IMAGENET_MODELS, TVResNet, CifarResNet, WideResNet, get_model, feature_layers,
                            feature_shapes, load_teacher, model_name_from_path, read_state_dict, matching_models,
                            CheckpointError, UnsafeCheckpointError)

SPEC_FILE = Path(__file__).resolve().parent/'specs'/'cifar_zoo.json'  # the CRD benchmark's parameter counts, state_dict keys and shapes
SPEC = json.loads(SPEC_FILE.read_text())['models']
needs_spec = pytest.mark.skipif(not SPEC, reason=f"the benchmark's specification {SPEC_FILE} is empty")
NAMES = list(CIFAR_MODELS)

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Batches of 2 gain nothing from a second thread, and lose much when the cores are shared (OpenMP threads spin-wait)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@lru_cache(maxsize=None)
def built(name):
    "One model per name, built once for the whole module (tests only read shapes or run it)."
    torch.manual_seed(0)
    return get_model(name)

def hooked(model, layers, x):
    "Run `model` on `x` with forward hooks on `layers`; return the outputs as the hooks saw them and after the forward."
    seen, copies = {}, {}
    def keep(l):
        def hook(m, i, o): seen[l], copies[l] = o, o.detach().clone()
        return hook
    hs = [model.get_submodule(l).register_forward_hook(keep(l)) for l in layers]
    try: model(x)
    finally:
        for h in hs: h.remove()
    return [seen[l] for l in layers], [copies[l] for l in layers]

# ---------------------------------------------------------------- the CIFAR zoo against the specification

@needs_spec
def test_spec_lists_exactly_the_zoo():
    assert sorted(SPEC) == sorted(NAMES)

@needs_spec
@pytest.mark.parametrize('name', NAMES)
def test_keys_shapes_and_params_match_spec(name):
    m, s = built(name), SPEC[name]
    own = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert sorted(set(s['state_dict']) - set(own)) == [], 'keys of the benchmark missing here'
    assert sorted(set(own) - set(s['state_dict'])) == [], 'keys the benchmark does not have'
    assert own == s['state_dict']
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == s['params']

@needs_spec
@pytest.mark.parametrize('name', NAMES)
def test_hooked_features_match_spec(name):
    m = built(name).eval()
    layers = feature_layers(name)
    assert feature_layers(m) == layers
    with torch.no_grad(): seen, copies = hooked(m, layers, torch.randn(2, 3, 32, 32))
    assert [list(f.shape[1:]) for f in seen] == SPEC[name]['feature_shapes']
    assert all(f.shape[0] == 2 for f in seen)
    for f, c in zip(seen, copies): assert torch.equal(f, c), 'a hooked feature was modified in place later in the forward'
    assert [list(s) for s in feature_shapes(name)] == SPEC[name]['feature_shapes']  # the meta-device path agrees

@needs_spec
@pytest.mark.parametrize('name', NAMES)
def test_state_dict_from_spec_loads_strictly(name):
    "A checkpoint with the benchmark's keys and shapes (random values) loads with strict=True."
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.zeros((), dtype=torch.long) if k.endswith('num_batches_tracked') else torch.rand(shape, generator=g)
          for k, shape in SPEC[name]['state_dict'].items()}
    m = built(name)
    res = m.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())

@pytest.mark.parametrize('name', NAMES)
def test_forward_backward(name):
    m = built(name).train()
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    m.zero_grad(); out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())

def test_num_classes_and_unknown_names():
    assert get_model('vgg8', num_classes=10).classifier.out_features == 10
    assert get_model('mobile_half').classifier[0].out_features == 100  # the benchmark's code name for MobileNetV2
    assert type(get_model('shufflev1')).__name__ == 'ShuffleNetV1'
    with pytest.raises(ValueError, match=r"Did you mean.*'resnet32x4'"): get_model('resnet32x5')
    with pytest.raises(ValueError, match='load_teacher'): get_model('resnet8', pretrained=True)

def test_feature_conventions():
    "Post-ReLU features are non-negative; WRN's stage outputs (residual sums) and MobileNetV2's (linear bottlenecks) are not."
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    mins = {}
    for n in ['resnet8', 'vgg8', 'ShuffleV1', 'ShuffleV2', 'wrn_16_2', 'MobileNetV2']:
        with torch.no_grad(): seen, _ = hooked(get_model(n).eval(), feature_layers(n), x)
        mins[n] = [f.min().item() for f in seen]
    for n in ['resnet8', 'vgg8', 'ShuffleV1', 'ShuffleV2']: assert min(mins[n]) >= 0, n
    assert all(v < 0 for v in mins['wrn_16_2'][:4]) and mins['wrn_16_2'][-1] >= 0  # conv1 and stages raw; pooled after BN-ReLU
    assert mins['MobileNetV2'][0] >= 0 and all(v < 0 for v in mins['MobileNetV2'][1:5]) and mins['MobileNetV2'][-1] >= 0

def test_pairs_of_the_paper():
    for t, s in [('wrn_40_2', 'wrn_16_2'), ('resnet110', 'resnet20'), ('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8')]:
        assert feature_shapes(t) == feature_shapes(s)
    assert not any(a == b for a, b in zip(feature_shapes('resnet32x4'), feature_shapes('ShuffleV2')))

# ---------------------------------------------------------------- torchvision ResNets

@pytest.mark.parametrize('name', list(IMAGENET_MODELS))
def test_tv_state_dict_is_torchvisions(name):
    with torch.device('meta'):
        ours, theirs = get_model(name), torchvision.models.get_model(name[len('tv_'):])
    assert isinstance(ours, TVResNet)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}

def test_tv_feature_layers():
    torch.manual_seed(0)
    m = get_model('tv_resnet18').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): seen, _ = hooked(m, feature_layers(m), x)
    assert [tuple(f.shape[1:]) for f in seen] == [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512,)]
    assert feature_shapes('tv_resnet50', size=(3, 224, 224))[-2:] == [(2048, 7, 7), (2048,)]
    plain = torchvision.models.resnet18().eval()  # built by torchvision: no `flatten`, so the pooled layer is avgpool
    plain.load_state_dict(m.state_dict())
    with torch.no_grad(): seen2, _ = hooked(plain, feature_layers(plain), x)
    assert feature_layers(plain)[-1] == 'avgpool' and seen2[-1].shape == (2, 512, 1, 1)
    for a, b in zip(seen, seen2): torch.testing.assert_close(a.flatten(1), b.flatten(1))
    assert torch.equal(plain(x), m(x))
    with pytest.raises(ValueError, match='No feature layers'): feature_layers(nn.Sequential(nn.Linear(2, 2)))

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    "An empty torch hub cache in tmp_path and no network: a download raises URLError."
    def no_network(*args, **kwargs): raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path/'hub'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    return tmp_path/'hub'/'checkpoints'

def test_pretrained_without_network_names_the_alternatives(offline_hub):
    with pytest.raises(RuntimeError) as e: get_model('tv_resnet34', pretrained=True)
    msg = str(e.value)
    assert 'resnet34-b627a593.pth' in msg and str(offline_hub) in msg and "load_teacher(path, name='tv_resnet34')" in msg
    assert not any(offline_hub.glob('*.pth'))

def test_pretrained_from_the_cache(offline_hub):
    offline_hub.mkdir(parents=True)
    torch.manual_seed(3)
    src = get_model('tv_resnet18')
    torch.save(src.state_dict(), offline_hub/'resnet18-f37072fd.pth')
    for pretrained in (True, 'IMAGENET1K_V1', 'default', torchvision.models.ResNet18_Weights.IMAGENET1K_V1):
        m = get_model('tv_resnet18', pretrained=pretrained)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))
    with pytest.raises(ValueError, match='IMAGENET1K_V1'): get_model('tv_resnet18', pretrained='IMAGENET1K_V9')
    with pytest.raises(ValueError, match='1000 classes'): get_model('tv_resnet18', num_classes=10, pretrained=True)
    m = load_teacher(offline_hub/'resnet18-f37072fd.pth')  # torchvision's file name says which model
    assert isinstance(m, TVResNet) and not m.training

# ---------------------------------------------------------------- load_teacher: layouts and names

def trained(name='resnet8', num_classes=100, seed=0):
    "A model whose weights and BN statistics differ from a fresh one's, plus its optimizer."
    torch.manual_seed(seed)
    m = get_model(name, num_classes=num_classes)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward(); opt.step()
    return m.eval(), opt

def same_model(a, b):
    x = torch.randn(2, 3, 32, 32)
    assert type(a) is type(b) and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad(): assert torch.equal(a.eval()(x), b.eval()(x))

def test_benchmark_checkpoint_layout(tmp_path):
    m, opt = trained()
    f = tmp_path/'resnet8_vanilla'/'ckpt_epoch_240.pth'; f.parent.mkdir()
    torch.save({'epoch': 240, 'model': m.state_dict(), 'accuracy': torch.tensor(71.3), 'optimizer': opt.state_dict()}, f)
    t = load_teacher(f)
    assert not t.training
    same_model(t, m)

def test_bare_state_dict(tmp_path):
    m, _ = trained('wrn_16_1')
    torch.save(m.state_dict(), tmp_path/'weights.pth')
    same_model(load_teacher(tmp_path/'weights.pth', name='wrn_16_1'), m)
    same_model(load_teacher(str(tmp_path/'weights.pth')), m)  # no name anywhere: found by its keys
    torch.save({'state_dict': {f'module.{k}': v for k, v in m.state_dict().items()}}, tmp_path/'dp.pth')  # DataParallel
    same_model(load_teacher(tmp_path/'dp.pth', name='wrn_16_1'), m)

@pytest.mark.parametrize('name', ['resnet32x4', 'wrn_40_2'])
def test_benchmark_folder_naming(tmp_path, name):
    m, _ = trained(name)
    f = tmp_path/f'{name}_vanilla'/'ckpt_epoch_240.pth'; f.parent.mkdir()
    torch.save({'epoch': 240, 'model': m.state_dict()}, f)
    same_model(load_teacher(f), m)

@pytest.mark.parametrize('name', NAMES)
def test_model_name_from_benchmark_folders(name):
    assert model_name_from_path(f'/save/models/{name}_vanilla/ckpt_epoch_240.pth') == name
    assert model_name_from_path(f'{name}_best.pth') == name

def test_model_name_from_other_paths():
    assert model_name_from_path('/save/mobile_half_vanilla/ckpt_epoch_240.pth') == 'MobileNetV2'
    assert model_name_from_path('resnet32x4_vanilla/resnet8_notes/ckpt.pth') == 'resnet8'  # the nearest folder only
    assert model_name_from_path('/data/resnet110_runs/teacher.pth') == 'resnet110'
    assert model_name_from_path('teachers/best.pth') is None
    for name in IMAGENET_MODELS:  # torchvision's own weight files
        for w in torchvision.models.get_model_weights(name[len('tv_'):]):
            assert model_name_from_path(f'~/.cache/torch/hub/checkpoints/{Path(w.url).name}') == name
    with pytest.raises(CheckpointError, match='name='): model_name_from_path('S:resnet8x4_T:resnet32x4_cifar100_kd_r:0.1/ckpt.pth')

def test_num_classes_from_the_final_layer(tmp_path):
    for name in ['resnet8', 'MobileNetV2', 'ShuffleV2']:
        m, _ = trained(name, num_classes=10)
        torch.save({'model': m.state_dict()}, tmp_path/f'{name}.pth')
        t = load_teacher(tmp_path/f'{name}.pth')
        same_model(t, m)
    with pytest.raises(CheckpointError, match="'fc.weight' is \\(10, 64\\) in the checkpoint but \\(100, 64\\)"):
        load_teacher(tmp_path/'resnet8.pth', num_classes=100)

@needs_spec
@pytest.mark.parametrize('name', ['resnet20', 'resnet8x4', 'wrn_16_2', 'vgg8', 'MobileNetV2', 'ShuffleV1', 'ShuffleV2'])
def test_spec_shaped_checkpoint_loads(tmp_path, name):
    "A file shaped like the benchmark's (built from the spec, not from our models) loads by its folder name."
    sd = {k: torch.zeros((), dtype=torch.long) if k.endswith('num_batches_tracked') else torch.rand(s)
          for k, s in SPEC[name]['state_dict'].items()}
    f = tmp_path/f'{name}_vanilla'/'ckpt_epoch_240.pth'; f.parent.mkdir()
    torch.save({'epoch': 240, 'model': sd}, f)
    t = load_teacher(f)
    assert all(torch.equal(t.state_dict()[k], v) for k, v in sd.items())

def _tag_as_cuda(storage):
    if storage.device.type == 'cpu': return 'cuda:0'

def test_checkpoint_from_a_gpu_loads_on_cpu(tmp_path):
    m, _ = trained('resnet14')
    f = tmp_path/'resnet14_vanilla'/'ckpt_epoch_240.pth'; f.parent.mkdir()
    if torch.cuda.is_available(): torch.save({'model': {k: v.cuda() for k, v in m.state_dict().items()}}, f)
    else:  # no GPU here: write the file as a GPU run would, every storage tagged 'cuda:0'
        torch.serialization.register_package(0, _tag_as_cuda, lambda obj, location: None)
        try: torch.save({'model': m.state_dict()}, f)
        finally: torch.serialization._package_registry[:] = [r for r in torch.serialization._package_registry if r[1] is not _tag_as_cuda]
        with pytest.raises(RuntimeError, match='CUDA'): torch.load(f, weights_only=True)  # the file really says cuda
    assert b'cuda:0' in zipfile.ZipFile(f).read(next(n for n in zipfile.ZipFile(f).namelist() if n.endswith('data.pkl')))
    t = load_teacher(f)
    assert next(t.parameters()).device.type == 'cpu'
    same_model(t, m)

def test_legacy_torch_save_format(tmp_path):
    m, opt = trained()
    torch.save({'epoch': 240, 'model': m.state_dict(), 'optimizer': opt.state_dict()}, tmp_path/'resnet8_old.pth',
               _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path/'resnet8_old.pth')
    same_model(load_teacher(tmp_path/'resnet8_old.pth'), m)

# ---------------------------------------------------------------- load_teacher: errors

def test_wrong_model_names_keys_and_first_shape_mismatch(tmp_path):
    m, _ = trained()
    f = tmp_path/'resnet8_vanilla'/'ckpt_epoch_240.pth'; f.parent.mkdir()
    torch.save({'model': m.state_dict()}, f)
    with pytest.raises(CheckpointError) as e: load_teacher(f, name='resnet8x4')
    msg = str(e.value)
    assert 'does not fit resnet8x4' in msg and 'missing keys' in msg and "'layer1.0.downsample.0.weight'" in msg
    assert '0 unexpected keys' in msg
    assert "first shape mismatch: 'conv1.weight' is (16, 3, 3, 3) in the checkpoint but (32, 3, 3, 3) in resnet8x4" in msg
    assert "pass name='resnet8'" in msg
    with pytest.raises(CheckpointError, match=r"does not fit resnet14: 36 missing keys \['layer1.1.conv1.weight'"):
        load_teacher(f, name='resnet14')
    w, _ = trained('wrn_16_2')
    g = tmp_path/'wrn_16_1_vanilla'/'ckpt.pth'; g.parent.mkdir()  # a folder that names the wrong model
    torch.save({'model': w.state_dict()}, g)
    with pytest.raises(CheckpointError) as e: load_teacher(g)
    msg = str(e.value)
    assert 'does not fit wrn_16_1' in msg and "1 unexpected keys ['block1.layer.0.convShortcut.weight']" in msg
    assert "pass name='wrn_16_2'" in msg

def test_unknown_contents(tmp_path):
    torch.save({'weights': torch.zeros(3)}, tmp_path/'odd.pth')
    with pytest.raises(CheckpointError, match='fit no model of the zoo'): load_teacher(tmp_path/'odd.pth')

def test_not_a_checkpoint(tmp_path):
    (tmp_path/'notes.txt').write_text('resnet8 teacher, 240 epochs\n')
    (tmp_path/'empty.pth').write_bytes(b'')
    with zipfile.ZipFile(tmp_path/'images.zip', 'w') as z: z.writestr('a.txt', 'not torch')
    torch.save([1, 2, 3], tmp_path/'list.pth')
    torch.save({'epoch': 3, 'accuracy': 0.5}, tmp_path/'meta.pth')
    with pytest.raises(CheckpointError, match='is not a checkpoint'): load_teacher(tmp_path/'notes.txt', name='resnet8')
    with pytest.raises(CheckpointError, match='is empty'): load_teacher(tmp_path/'empty.pth', name='resnet8')
    with pytest.raises(CheckpointError, match='not a readable checkpoint'): load_teacher(tmp_path/'images.zip', name='resnet8')
    with pytest.raises(CheckpointError, match='holds a list'): load_teacher(tmp_path/'list.pth', name='resnet8')
    with pytest.raises(CheckpointError, match="neither a state_dict"): load_teacher(tmp_path/'meta.pth', name='resnet8')
    with pytest.raises(CheckpointError, match='is not a file'): load_teacher(tmp_path/'missing.pth', name='resnet8')

class RunInfo:
    "An arbitrary class, as a training script might pickle next to the weights."
    def __init__(self): self.note = 'teacher run 3'

class Trap:
    "Unpickling this creates a file: the proof that code from the file ran."
    def __init__(self, path): self.path = path
    def __reduce__(self): return (open, (str(self.path), 'w'))

def test_arbitrary_objects_are_refused_unless_trusted(tmp_path):
    m, _ = trained()
    for kw in (dict(), dict(_use_new_zipfile_serialization=False)):
        f = tmp_path/f'resnet8_info{len(kw)}.pth'
        torch.save({'model': m.state_dict(), 'info': RunInfo()}, f, **kw)
        with pytest.raises(UnsafeCheckpointError) as e: load_teacher(f)
        assert 'RunInfo' in str(e.value) and 'trusted=True' in str(e.value)
        same_model(load_teacher(f, trusted=True), m)
    with open(tmp_path/'resnet8.pkl', 'wb') as fh: pickle.dump({'model': m.state_dict(), 'info': RunInfo()}, fh)
    with pytest.raises(UnsafeCheckpointError, match='plain pickle.*trusted=True'): load_teacher(tmp_path/'resnet8.pkl')
    same_model(load_teacher(tmp_path/'resnet8.pkl', trusted=True), m)
    torch.save(m, tmp_path/'resnet8_whole.pth')  # a whole pickled model
    with pytest.raises(UnsafeCheckpointError, match='CifarResNet'): load_teacher(tmp_path/'resnet8_whole.pth')
    same_model(load_teacher(tmp_path/'resnet8_whole.pth', trusted=True), m)

def test_no_code_runs_from_an_untrusted_file(tmp_path):
    marker = tmp_path/'ran'
    torch.save({'model': trained()[0].state_dict(), 'x': Trap(marker)}, tmp_path/'resnet8_trap.pth')
    with open(tmp_path/'resnet8_trap.pkl', 'wb') as fh: pickle.dump({'x': Trap(marker)}, fh)
    assert not marker.exists()
    for f in ('resnet8_trap.pth', 'resnet8_trap.pkl'):
        with pytest.raises(UnsafeCheckpointError): load_teacher(tmp_path/f)
        with pytest.raises(UnsafeCheckpointError): read_state_dict(tmp_path/f)
    assert not marker.exists()

def test_matching_models_ignores_the_number_of_classes():
    assert matching_models(get_model('vgg11', num_classes=7).state_dict()) == ['vgg11']
    with torch.device('meta'): sd = get_model('tv_resnet50').state_dict()
    assert matching_models(sd) == ['tv_resnet50']
