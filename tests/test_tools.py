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
