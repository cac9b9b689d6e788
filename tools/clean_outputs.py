"""Normalise the outputs saved in notebooks, and find what would still be dirty.

Saved outputs are part of the lessons, so they must read as a person sees them: no ANSI colour codes, no
progress-bar residue (carriage-return frames, block characters), no absolute temporary paths. `clean` rewrites
an output the way a terminal would have left it (the last frame of each line), `problems` lists what a cell's
outputs still hold. `make export` runs this file over nbs/; `tools/check_sync.py` fails when anything changes.
"""
import json, re, sys
from pathlib import Path

ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')
TMP = re.compile(r'(?:/private)?/(?:tmp|var/folders/[\w/]+?)/tmp[\w.-]+')
# a warning that a library raised, as Python prints it: `/path/to/module.py:123: FutureWarning: ...`
LIB_WARNING = re.compile(r'\.py:\d+: \w*Warning: ')
FRAME = re.compile(r'(?:Epoch \d+/\d+ : )?\|[-█]{10,}\|\s*[\d.]+%\s*\[[^\]]*\]')  # a fastprogress frame
BAR = re.compile(r'[█▏▎▍▌▋▊▉]|\|[-█]{10,}\|')

def clean_text(t:str)->str:
    "The text a terminal would show: each line's last carriage-return frame, without ANSI codes, bars or temporary folders."
    lines = []
    for l in t.split('\n'):
        if '\r' in l: l = next((f for f in reversed(l.split('\r')) if f.strip()), '')
        l = TMP.sub('tmp', BAR.sub('', FRAME.sub('', ANSI.sub('', l))))
        lines.append(l)
    return '\n'.join(lines)

def _texts(o:dict):
    "The (container, key) pairs of an output that hold text."
    if o.get('output_type') == 'stream': yield o, 'text'
    for k in ('text/plain', 'text/markdown'):
        if k in o.get('data', {}): yield o['data'], k
    if o.get('output_type') == 'error': yield o, 'traceback'

def clean(nb:dict)->bool:
    "Clean every text output of `nb` in place; whether anything changed."
    changed = False
    for c in nb.get('cells', []):
        n = len(c.get('outputs', []))
        for o in c.get('outputs', []):
            for d, k in _texts(o):
                old = ''.join(d[k]) if isinstance(d[k], list) else d[k]
                new = clean_text(old) if k != 'traceback' else old
                if new != old: d[k] = new.splitlines(keepends=True); changed = True
        if 'outputs' in c:  # a stream that only held terminal control codes is gone
            c['outputs'] = [o for o in c['outputs'] if not (o.get('output_type') == 'stream' and not ''.join(o['text']).strip())]
            changed |= len(c['outputs']) != n
    return changed

def problems(nb:dict)->list:
    "`(cell id, what)` for each output that still holds ANSI codes, progress-bar residue, a temporary path or a library's warning."
    res = []
    for c in nb.get('cells', []):
        for o in c.get('outputs', []):
            for d, k in _texts(o):
                t = ''.join(d[k]) if isinstance(d[k], list) else d[k]
                for name, pat in (('ANSI escape codes', ANSI), ('a progress bar', BAR), ('an absolute temporary path', TMP),
                                  ("a library's warning (filter it in a hidden cell)", LIB_WARNING)):
                    if pat.search(t): res.append((c.get('id'), name))
                if '\r' in t: res.append((c.get('id'), 'carriage returns (progress-bar frames)'))
    return res

if __name__ == '__main__':
    root = Path(__file__).resolve().parent.parent
    for f in sorted(root.glob('nbs/**/*.ipynb')):
        if '.ipynb_checkpoints' in f.parts: continue
        nb = json.loads(f.read_text())
        if clean(nb): f.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n'); print(f"cleaned outputs of {f.relative_to(root)}")
