"The output cleaner that `make export` runs and `make test` checks (tools/clean_outputs.py)."
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent/'tools'))
from clean_outputs import clean_text, clean, problems


def nb(*texts): return {'cells': [{'id': 'c1', 'cell_type': 'code', 'outputs': [{'output_type': 'stream', 'name': 'stdout', 'text': [t]} for t in texts]}]}


def test_a_terminal_line_keeps_its_last_frame_without_codes_bars_or_temporary_folders():
    frames = 'Epoch 1/3 : |----------------------------------------| 0.00% [0/2 00:00<?]\rEpoch 1/3 : |████████████████████████████████████████| 100.00% [2/2 00:01<00:00]\rdone'
    assert clean_text(frames) == 'done'
    assert clean_text('\x1b[31mred\x1b[0m text') == 'red text'
    assert clean_text('saved to /tmp/tmpab12_x/run/last.pth') == 'saved to tmp/run/last.pth'
    assert '█' not in clean_text('|████------| 40%\n')


def test_clean_outputs_are_found_clean_and_dirty_ones_are_named():
    dirty = nb('\x1b[2K\r\x1b[2K\r', 'Epoch 2/3 : |----------------------------------------| 0.00% [0/2 00:00<?]killed\n', 'in /tmp/tmp9x8y/out\n')
    assert {w for _, w in problems(dirty)} >= {'ANSI escape codes', 'a progress bar', 'an absolute temporary path'}
    assert clean(dirty) and problems(dirty) == []
    texts = [''.join(o['text']) for o in dirty['cells'][0]['outputs']]
    assert texts == ['killed\n', 'in tmp/out\n']  # the stream of control codes alone is dropped
    assert not clean(dirty)  # cleaning twice changes nothing
    warned = nb('/venv/lib/python3.11/site-packages/torch/jit/_script.py:1491: FutureWarning: `torch.jit.script` is deprecated.\n')
    assert [w for _, w in problems(warned)] == ["a library's warning (filter it in a hidden cell)"]


def test_a_figure_in_prose_must_agree_with_a_result_file_or_the_notebooks_own_output(tmp_path):
    "tools/check_numbers.py: a quoted time, ratio or decimal accuracy that no source holds is named; one that rounds to a source passes."
    import json
    from check_numbers import figures, check
    assert [f[0] for f in figures('IPOT takes 1.83 ms, 2.5x the cost ($0.5 ms$ in math and `3.1 ms` in code are not prose); 150 minutes')] == ['1.83 ms', '2.5x']
    md = lambda s: {'id': 'm', 'cell_type': 'markdown', 'source': s}
    out = {'id': 'c', 'cell_type': 'code', 'source': 'print(t)', 'outputs': [{'output_type': 'stream', 'name': 'stdout', 'text': ['ipot 1.8349 ms\n']}]}
    p = tmp_path/'nb.ipynb'
    p.write_text(json.dumps({'cells': [out, md('IPOT takes 1.83 ms.')]}))
    assert check(p, set()) == []  # the output holds 1.8349, which rounds to 1.83
    p.write_text(json.dumps({'cells': [out, md('IPOT takes 1.95 ms, 76.53% top-1.')]}))
    assert check(p, set()) == [(1, '1.95 ms'), (1, '76.53%')]
    assert check(p, {1.95, 0.7653}) == []  # a result file holding them (an accuracy as a fraction counts in percent)


def test_the_layout_check_names_long_modules_long_cells_private_and_backward_imports(tmp_path, monkeypatch):
    import json, check_layout
    (tmp_path/'nbs').mkdir(); (tmp_path/'otkd_nb').mkdir()
    def notebook(name, exp, *cells):
        src = [f'#| default_exp {exp}'] + list(cells)
        (tmp_path/'nbs'/name).write_text(json.dumps({'cells': [{'cell_type': 'code', 'source': s} for s in src]}))
    notebook('00_a.ipynb', 'a', '#| export\n' + 'x = 1\n' * 41)
    notebook('01_b.ipynb', 'b', '#| export\ny = 2')
    (tmp_path/'otkd_nb'/'a.py').write_text('from .b import y\n' + 'z = 0\n' * 400)
    (tmp_path/'otkd_nb'/'b.py').write_text('from otkd_nb.a import _hidden, x\n')
    monkeypatch.setattr(check_layout, 'root', tmp_path)
    found = check_layout.problems()
    assert found == ['otkd_nb/a.py: 401 lines (at most 400)',
                     'otkd_nb/a.py imports otkd_nb.b, which comes after it in reading order',
                     'otkd_nb/b.py imports private _hidden from otkd_nb.a',
                     'nbs/00_a.ipynb, cell 1: an export cell of 42 lines (at most 40)'], found
    (tmp_path/'otkd_nb'/'a.py').write_text('z = 0\n'); (tmp_path/'otkd_nb'/'b.py').write_text('from otkd_nb.a import x\n')
    notebook('00_a.ipynb', 'a', '#| export\nx = 1')
    assert check_layout.problems() == []
