"The study's bookkeeping, without training: records reused only for the same request, time limits, the tuned methods and the options of a combined row."
import json, shutil, subprocess, time
from pathlib import Path
import pytest
from otkd_nb.study import Study, Runner, Pause, TUNING, method_options, part_options, weight_grid
from otkd_nb.study_run import tuned_methods, study_info
from otkd_nb.runs import write_json


def record(runner, name, request, accuracy=0.8):
    rec = runner.record(name); rec.mkdir(parents=True)
    write_json(rec/'metrics.json', dict(accuracy=accuracy, complete=True))
    write_json(rec/'record.json', dict(request=request, commit='abc'))


def test_a_record_is_reused_only_for_the_same_request(tmp_path):
    r = Runner(Study(), tmp_path/'runs', tmp_path/'rec')
    req = dict(f='distill', method='kd', seed=0)
    record(r, 'tune/kd/w0.9_default_s0', req)
    assert r.reuse('tune/kd/w0.9_default_s0', req)['accuracy'] == 0.8
    assert r.reuse('tune/kd/w0.9_default_s0', {**req, 'seed': 1}) is None  # another request: trained again
    assert r.reuse('tune/kd/w0.9_default_s1', req) is None  # no record
    assert Runner(Study(), tmp_path/'runs', tmp_path/'rec', fresh=True).reuse('tune/kd/w0.9_default_s0', req) is None


def test_a_record_without_record_json_is_not_finished(tmp_path):
    r = Runner(Study(), tmp_path/'runs', tmp_path/'rec')
    record(r, 'final/kd/s0', dict(f='distill'))
    (r.record('final/kd/s0')/'record.json').unlink()  # killed while copying: record.json is written last
    assert r.reuse('final/kd/s0', dict(f='distill')) is None


def test_the_time_limit_pauses_before_a_new_run_but_not_before_a_recorded_one(tmp_path):
    from otkd_nb.fit import train_teacher
    r = Runner(Study(), tmp_path/'runs', tmp_path/'rec', max_minutes=1)
    r.t0 = time.time() - 120  # two minutes ago
    kw = dict(model='resnet8', epochs=1, seed=0)
    req = json.loads(json.dumps(dict(f='train_teacher', **kw)))
    record(r, 'schedule/done', req)
    assert r.run('schedule/done', train_teacher, **kw)['accuracy'] == 0.8
    with pytest.raises(Pause, match='run the same command again'): r.run('schedule/new', train_teacher, **kw)
    assert not (tmp_path/'runs'/'schedule'/'new').exists()


def test_tuned_methods_and_the_combined_row():
    s = Study(methods=('student', 'kd', 'ipot+crd+kd'))
    assert tuned_methods(s) == ['kd', 'crd+kd', 'ipot+kd']  # IPOT+CRD+KD takes what its parts won alone
    choices = {'ipot+kd': dict(weight=3., structure='alternative'), 'crd+kd': dict(weight=0.08, structure='default')}
    o = method_options('ipot+crd+kd', s, choices)
    assert o['ipot'] == dict(weight=3., student_layers=['flatten'], teacher_layers=['flatten'])
    assert o['crd'] == dict(weight=0.08, n_neg=4096)
    assert method_options('student', s, choices) is None


def test_every_method_gets_the_same_number_of_runs():
    s = Study()
    info = study_info(s, 'tune', False, None)
    norms = dict(kd=1., fitnet=1., ipot=0.5, remd=0.4, ce=1.)
    grids = {m: weight_grid(m, s, norms) for m in TUNING}
    assert {len(g) for g in grids.values()} == {3}
    for m, g in grids.items(): assert max(g) / min(g) >= 99, (m, g)  # two orders of magnitude (OT: rounded to two digits)
    assert info['expected'] == dict(tuning=len(TUNING) * 4 * 2, final=9 * 5)
    with pytest.raises(ValueError, match='calibrate'): weight_grid('ipot+kd', s)


def test_records_of_an_earlier_setting_are_left_out_of_the_tables(tmp_path):
    from dataclasses import asdict
    from otkd_nb.results import load_records
    s = Study(methods=('student', 'kd'))
    r = Runner(s, tmp_path/'runs', tmp_path/'rec')
    for name, n_train in (('final/kd/s0', s.n_train), ('final/kd/s1', 2 * s.n_train)):
        record(r, name, dict(f='distill', method='kd', n_train=n_train, bs=s.bs, epochs=s.epochs, seed=0))
        write_json(r.record(name)/'metrics.json', dict(accuracy=0.8, best_accuracy=0.81, best_epoch=3, epochs=s.epochs, complete=True))
    t = load_records(tmp_path/'rec', study=asdict(s))
    assert t['final'].seed.tolist() == [0]  # the run on twice the images belongs to another setting
    assert len(load_records(tmp_path/'rec')['final']) == 2  # without the study's settings every record counts

def test_the_records_of_finished_runs_are_not_ignored_by_git():
    "The study continues on another machine from the records main holds, so git must not ignore them (while the runs' checkpoint folders stay out)."
    root = Path(__file__).resolve().parents[1]
    if not (root/'.git').exists() or shutil.which('git') is None: pytest.skip('not a git checkout')
    def ignored(p): return subprocess.run(['git', 'check-ignore', '-q', p], cwd=root).returncode == 0
    assert not ignored('results/fashion_mnist/runs/tune/kd/w0.9_default_s0/record.json')
    assert not ignored('results/fashion_mnist/runs/teacher/metrics.json')
    assert ignored('runs/study/teacher/last.pth')


def test_the_names_that_moved_to_study_run_still_import_from_study():
    import otkd_nb.study, otkd_nb.study_run
    from otkd_nb.study import main, run_study
    assert main is otkd_nb.study_run.main and run_study is otkd_nb.study_run.run_study
    with pytest.raises(AttributeError, match='no attribute'): otkd_nb.study.no_such_name
