"""Command lines, run folders, resume after a kill, and two-process (gloo) training (`otkd_nb.fit`, `otkd_nb.cli`)."""
import json, os, shutil, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest, torch

warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
from otkd_nb.train import parse_method, METHOD_PARTS
from otkd_nb.runs import RUN_FILES
from otkd_nb.fit import distill, train_teacher
from otkd_nb.cli import train_teacher_main, distill_main, demo_main
from otkd_nb.data import write_fake_cifar100
from otkd_nb.study_run import main as results_main, study_lock
from otkd_nb.models import get_model

BIN = Path(sys.executable).parent
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A small CIFAR-100 in the real format and a resnet8 teacher checkpoint (random weights, the benchmark's format)."
    d = tmp_path_factory.mktemp('train')
    write_fake_cifar100(d/'cifar', n_train=640, n_test=64)
    torch.manual_seed(0)
    torch.save({'model': get_model('resnet8').state_dict(), 'epoch': 240}, d/'resnet8_vanilla.pth')
    return d


def tiny(data, out, *extra):
    "Options of a tiny distillation: 2 batches of 64 per epoch, 2 epochs, 64 test images."
    return ['--dataset', 'cifar100', '--data', str(data/'cifar'), '--teacher', 'resnet8', '--teacher-ckpt', str(data/'resnet8_vanilla.pth'),
            '--student', 'resnet8', '--n-train', '128', '--epochs', '2', '--device', 'cpu', '--out', str(out), *extra]


# -- --help
HELP_OPTIONS = {
    train_teacher_main: ['--model', '--dataset', '--data', '--epochs', '--bs', '--lr', '--wd', '--seed', '--device', '--precision',
                         '--out', '--resume', '--overwrite', '--n-train', '--n-valid', '--split', '--stop-after', '--threads', '--num-workers'],
    distill_main: ['--teacher', '--teacher-ckpt', '--trusted', '--student', '--method', '--global-ot', '--dataset', '--data', '--epochs',
                   '--bs', '--lr', '--wd', '--seed', '--device', '--precision', '--out', '--resume', '--overwrite', '--n-train',
                   '--n-valid', '--split', '--stop-after', '--threads', '--num-workers', '--set'],
    demo_main: ['--out', '--data', '--teacher', '--student', '--methods', '--n-train', '--n-valid', '--teacher-epochs', '--epochs',
                '--bs', '--seed', '--threads', '--fresh', '--no-plot'],
    results_main: ['--stage', '--max-minutes', '--out', '--records', '--data', '--teacher', '--student', '--methods', '--seeds', '--tune-seeds',
                   '--n-train', '--n-valid', '--teacher-n-train', '--teacher-epochs', '--epochs', '--schedule-epochs', '--bs', '--multipliers',
                   '--calib-batches', '--threads', '--fresh', '--quiet', '--no-plot'],
}

@pytest.mark.parametrize('main', list(HELP_OPTIONS), ids=lambda f: f.__name__)
def test_help_lists_every_option_with_its_default(main, capsys):
    with pytest.raises(SystemExit) as e: main(['--help'])
    assert e.value.code == 0
    out = ' '.join(capsys.readouterr().out.split())
    for opt in HELP_OPTIONS[main]: assert opt in out, opt
    n_opts = len(HELP_OPTIONS[main])
    assert out.count('(default:') >= n_opts, out  # ArgumentDefaultsHelpFormatter: one per option (and -h has none)


def test_console_scripts_are_installed():
    for name in ('otkd-train-teacher', 'otkd-distill', 'otkd-demo', 'otkd-results', 'otkd-bench'): assert (BIN/name).exists() or shutil.which(name), name
    r = subprocess.run([str(BIN/'otkd-distill'), '--help'], capture_output=True, text=True, env=ENV, timeout=120)
    out = ' '.join(r.stdout.split())
    assert r.returncode == 0 and '--global-ot' in out and '(default: ipot+kd)' in out


# -- bad input
def test_unknown_method_lists_the_valid_ones(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e: distill_main(tiny(data, tmp_path/'run', '--method', 'ipot+kdd'))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown method 'ipot+kdd'" in err and all(p in err for p in METHOD_PARTS) and 'ipot+crd+kd' in err
    assert not (tmp_path/'run').exists()
    with pytest.raises(ValueError, match='student'): parse_method('kd+kd')


def test_missing_data_and_wrong_checkpoint(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path/'cache')); monkeypatch.delenv('OTKD_DATA', raising=False)
    assert train_teacher_main(['--dataset', 'svhn', '--data', str(tmp_path/'nothing'), '--out', str(tmp_path/'a'), '--device', 'cpu']) == 1
    err = capsys.readouterr().err
    assert 'SVHN not found. Places tried' in err and str(tmp_path/'nothing') in err
    torch.save({'model': get_model('resnet14').state_dict()}, tmp_path/'other.pth')
    args = tiny(data, tmp_path/'b', '--method', 'kd'); args[args.index('--teacher-ckpt') + 1] = str(tmp_path/'other.pth')
    assert distill_main(args) == 1
    err = capsys.readouterr().err
    assert 'does not fit resnet8' in err and "pass name='resnet14'" in err
    assert not (tmp_path/'a').exists() and not (tmp_path/'b').exists()


def test_set_options_reach_the_callbacks_and_the_config(data, tmp_path, capsys):
    out = tmp_path/'run'
    assert distill_main(tiny(data, out, '--method', 'ipot+kd', '--set', 'ipot.weight=2.5', '--set', 'ipot.beta=0.2',
                             '--set', 'ipot.student_layers=layer3', '--set', 'ipot.teacher_layers=layer3', '--set', 'kd.T=2')) == 0
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['options'] == {'ipot': {'weight': 2.5, 'beta': 0.2, 'student_layers': ['layer3'], 'teacher_layers': ['layer3']}, 'kd': {'T': 2}}
    # the same options resume the finished run; other ones are another recipe
    assert distill_main(tiny(data, out, '--method', 'ipot+kd', '--resume', '--set', 'ipot.weight=2.5', '--set', 'ipot.beta=0.2',
                             '--set', 'ipot.student_layers=layer3', '--set', 'ipot.teacher_layers=layer3', '--set', 'kd.T=2')) == 0
    capsys.readouterr()
    assert distill_main(tiny(data, out, '--method', 'ipot+kd', '--resume', '--set', 'ipot.weight=1')) == 1
    assert 'options' in capsys.readouterr().err
    # a misspelt argument, or a part that the method does not use, stops before anything is written
    for bad, msg in ((['--set', 'ipot.betta=0.1'], "no argument ['betta']"), (['--set', 'crd.weight=1'], 'does not use'),
                     (['--set', 'ipot:weight=1'], 'PART.ARG=VALUE')):
        with pytest.raises(SystemExit) as e: distill_main(tiny(data, tmp_path/'bad', '--method', 'ipot+kd', *bad))
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path/'bad').exists()


def test_results_refuses_a_second_call_in_the_same_folder(tmp_path):
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (tmp_path/'results.pid').write_text(str(child.pid))
        with pytest.raises(RuntimeError, match=f'pid {child.pid}'): study_lock(tmp_path)
    finally: child.kill(); child.wait()
    lock = study_lock(tmp_path)  # the process is gone: its stale lock is taken over
    assert lock.read_text() == str(os.getpid())


# -- a run and its folder
def test_tiny_run_writes_its_files_and_refuses_to_mix_runs(data, tmp_path, capsys):
    out = tmp_path/'run'
    assert distill_main(tiny(data, out, '--method', 'ipot+kd')) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # no temporary file left
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['method'], cfg['teacher'], cfg['epochs'], cfg['bs'], cfg['lr'], cfg['wd'], cfg['kd']) == \
        ('ipot+kd', 'resnet8', 2, 64, 0.05, 5e-4, {'T': 4.0, 'ce_weight': 1.0, 'kd_weight': 1.0})  # X+KD: the benchmark's -r 1 -a 1
    lines = (out/'log.csv').read_text().splitlines()
    assert lines[0].split(',') == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'ce', 'ipot', 'kd', 'train_accuracy', 'time']
    assert [l.split(',')[0] for l in lines[1:]] == ['0', '1']
    last = torch.load(out/'last.pth', weights_only=True)
    assert last['epoch'] == 2 and set(last) == {'model', 'distill', 'opt', 'epoch', 'best', 'rng'}
    best = torch.load(out/'best.pth', weights_only=True)
    assert set(best) == {'model', 'epoch', 'accuracy'}
    m = json.loads((out/'metrics.json').read_text())
    assert m['complete'] and m['epochs_done'] == 2
    assert m['accuracy'] == pytest.approx(float(lines[-1].split(',')[3]), abs=1e-6)  # the last epoch's logged accuracy
    capsys.readouterr()
    # another run into the same folder is refused, and says how to go on
    assert distill_main(tiny(data, out, '--method', 'kd')) == 1
    err = capsys.readouterr().err
    assert 'holds another run' in err and '--resume' in err and '--overwrite' in err
    assert json.loads((out/'config.json').read_text())['method'] == 'ipot+kd'
    assert distill_main(tiny(data, out, '--method', 'kd', '--resume')) == 1  # another recipe: no resume either
    assert 'its recipe differs' in capsys.readouterr().err
    assert distill_main(tiny(data, out, '--method', 'kd', '--overwrite')) == 0
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['method'], cfg['kd']) == ('kd', {'T': 4.0, 'ce_weight': 0.1, 'kd_weight': 0.9})  # KD alone: -r 0.1 -a 0.9


def test_train_teacher_checkpoint_is_a_teacher(data, tmp_path):
    res = train_teacher('resnet8', 'cifar100', out=tmp_path/'t', data=data/'cifar', n_train=128, epochs=1, device='cpu')
    assert res['complete']
    r = distill('resnet8', 'resnet8', tmp_path/'t'/'best.pth', 'kd', 'cifar100', out=tmp_path/'s', data=data/'cifar', n_train=128,
                epochs=1, device='cpu')
    assert r['teacher'] == 'resnet8' and r['complete']


# -- killed, then resumed
def test_killed_run_resumes_from_its_last_checkpoint(data, tmp_path):
    "A subprocess killed (SIGKILL) during an epoch; `--resume` ends the run with all epochs and the uninterrupted run's weights."
    args = ['--dataset', 'cifar100', '--data', str(data/'cifar'), '--teacher', 'resnet8', '--teacher-ckpt', str(data/'resnet8_vanilla.pth'),
            '--student', 'resnet8', '--method', 'kd', '--n-train', '640', '--n-valid', '64', '--epochs', '4', '--device', 'cpu',
            '--threads', '1']
    killed = tmp_path/'killed'
    p = subprocess.Popen([str(BIN/'otkd-distill'), *args, '--out', str(killed)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while not (killed/'last.pth').exists():
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 120
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL); p.wait(30)
    finally:
        if p.poll() is None: p.kill()
    done = torch.load(killed/'last.pth', weights_only=True)['epoch']
    assert 1 <= done < 4 and not (killed/'metrics.json').exists()
    assert distill_main([*args, '--out', str(killed), '--resume']) == 0
    m = json.loads((killed/'metrics.json').read_text())
    assert m['complete'] and m['epochs_done'] == 4
    assert [l.split(',')[0] for l in (killed/'log.csv').read_text().splitlines()[1:]] == ['0', '1', '2', '3']
    assert distill_main([*args, '--out', str(tmp_path/'whole')]) == 0
    a, b = (torch.load(d/'last.pth', weights_only=True) for d in (killed, tmp_path/'whole'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['opt']['hypers'][0]['lr'] == pytest.approx(b['opt']['hypers'][0]['lr'])


# -- two processes
DIST_SCRIPT = r'''
import sys, warnings; warnings.filterwarnings('ignore')
from pathlib import Path
import torch, torch.distributed as dist
from fastai.callback.core import Callback
from fastai.torch_core import rank_distrib
from otkd_nb.train import gather_batch
from otkd_nb.fit import distill
out, data = Path(sys.argv[1]), Path(sys.argv[2])
class Dump(Callback):
    "Each process saves its final weights (outside the run's folder)."
    order = 100
    def after_fit(self):
        m = getattr(self.learn.model, 'module', self.learn.model)
        torch.save({k: v.detach().cpu() for k, v in m.state_dict().items()}, out/f'rank{rank_distrib()}.pt')
class Bank(Callback):
    "CRD's memory bank after the first training batch, before DistributedDataParallel's next buffer broadcast."
    order = 100
    def after_batch(self):
        if self.training and self.learn.iter == 0 and self.learn.epoch == 0:
            m = getattr(self.learn.model, 'module', self.learn.model)
            torch.save(m.distill['crd'].memory_s.cpu(), out/f'bank{rank_distrib()}.pt')
res = distill('resnet8', 'resnet8', data/'resnet8_vanilla.pth', 'fitnet+ipot+crd+kd', 'cifar100', out=out/'run', data=data/'cifar',
              n_train=256, n_valid=64, epochs=2, bs=64, device='cpu', threads=1, global_ot=True, cbs=[Dump(), Bank()],
              options={'crd': {'n_neg': 256}})
r, w = dist.get_rank(), dist.get_world_size()
x = torch.full((3, 2), float(r + 1), requires_grad=True)
g = gather_batch(x)
assert g.shape == (3 * w, 2) and torch.equal(g[:, 0], torch.arange(1., w + 1).repeat_interleave(3)), g
(g * torch.arange(3. * w)[:, None]).sum().backward()  # the same loss on every process: each gets w x its part's gradient
assert torch.equal(x.grad, w * torch.arange(3. * w)[3 * r: 3 * r + 3, None].expand(3, 2)), x.grad
(out/f'rank{r}.txt').write_text(f"{r} of {w}: {res['epochs_done']} epochs")
'''

def test_two_processes_gloo(data, tmp_path):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()): pytest.skip('torch.distributed with gloo is not available')
    pytest.importorskip('accelerate')
    (tmp_path/'dist.py').write_text(DIST_SCRIPT)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
                        str(tmp_path/'dist.py'), str(tmp_path), str(data)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert [(tmp_path/f'rank{r}.txt').read_text() for r in (0, 1)] == ['0 of 2: 2 epochs', '1 of 2: 2 epochs']
    a, b = torch.load(tmp_path/'rank0.pt'), torch.load(tmp_path/'rank1.pt')
    assert a.keys() == b.keys() and any(k.startswith('distill.') for k in a)  # FitNet's regressor trained under DDP
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert torch.equal(torch.load(tmp_path/'bank0.pt'), torch.load(tmp_path/'bank1.pt'))  # each process applied the global batch's update
    run = tmp_path/'run'
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)  # one set of files, no temporary file left
    assert len((run/'log.csv').read_text().splitlines()) == 1 + 2
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['world_size'] == 2 and cfg['global_ot'] and cfg['bs'] == 64
    last = torch.load(run/'last.pth', weights_only=True)
    assert all(torch.equal(last['model'][k], a[k]) for k in last['model'])
