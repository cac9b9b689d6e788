"""Fail if a notebook's prose quotes a measured figure that no committed source holds.

Run by `make test` (through tools/check_sync.py). A *measured figure* in a markdown cell (outside LaTeX and code spans) is
a time (`0.83 ms`, `2 µs`, `1.5 s`), a ratio written as `1.55x` or `1.55×`, or a decimal with a unit of accuracy, size
or time (`76.53%`, `0.4 points`, `51.2 MB`, `2.5 min`). Each must agree, at the precision it is written with, with a
number in one of its sources:

- the committed result files: `bench_results/` and `results/` (`.md`, `.json`, `.csv`);
- the notebook's own saved outputs and code (what its cells compute or set, published reference figures included,
  e.g. `otkd_nb.wkd.WKD_PAPER`).

A figure that agrees with none of them is stale (a file was regenerated, a cell re-run) or was never measured here:
render it from its file with a cell, or remove it. Integer settings and estimates ("150 minutes", "95%") are not checked.

    python tools/check_numbers.py            # all notebooks
    python tools/check_numbers.py nbs/03_ipot.ipynb
"""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
NUM = re.compile(r'(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?')
UNIT = r'(?:ms|µs|us|s|sec|seconds?|min|minutes?|%|points?|MB|GB|MiB|GiB|KB|KiB)'
FIGURES = [
    re.compile(r'(?<![\w.$])(\d+(?:\.\d+)?)\s?(ms|µs|us)\b'),             # any time in ms or µs
    re.compile(r'(?<![\w.$])(\d+\.\d+)\s?' + UNIT + r'(?![\w])'),         # a decimal with a unit
    re.compile(r'(?<![\w.$])(\d+(?:\.\d+)?)(x|×)(?![\w])'),               # a ratio: 1.55x
]

def prose(md:str)->str:
    "The markdown without LaTeX, code spans, code blocks, links' targets and HTML comments."
    md = re.sub(r'```.*?```', ' ', md, flags=re.S)
    md = re.sub(r'<!--.*?-->', ' ', md, flags=re.S)
    md = re.sub(r'\$\$.*?\$\$|\$[^$\n]*\$', ' ', md, flags=re.S)
    md = re.sub(r'`[^`]*`', ' ', md)
    return re.sub(r'\]\([^)]*\)', ']', md)

def figures(md:str)->list:
    "The measured figures quoted in `md`: `(text, value, decimals)`."
    out, s = [], prose(md)
    for pat in FIGURES:
        for m in pat.finditer(s):
            num = m.group(1)
            out.append((m.group(0).strip(), float(num), len(num.split('.')[1]) if '.' in num else 0))
    return list(dict.fromkeys(out))

def numbers(text:str)->set:
    "Every number written in `text`."
    vals = set()
    for t in NUM.findall(text):
        try: vals.add(float(t))
        except ValueError: pass
    return vals

def output_text(cell:dict)->str:
    parts = []
    for o in cell.get('outputs', []):
        if 'text' in o: parts.append(''.join(o['text']))
        for k, v in o.get('data', {}).items():
            if k.startswith('text/') or k == 'application/json': parts.append(v if isinstance(v, str) else ''.join(v) if isinstance(v, list) else json.dumps(v))
    return '\n'.join(parts)

def shared_sources()->set:
    vals = set()
    for folder in ('bench_results', 'results'):
        for f in (root/folder).rglob('*') if (root/folder).exists() else []:
            if f.suffix in ('.md', '.json', '.csv') and f.is_file(): vals |= numbers(f.read_text(errors='ignore'))
    return vals

def agrees(value:float, decimals:int, vals:set)->bool:
    "Whether some number of `vals` rounds to `value` at `decimals` places (or is `value` in percent of a fraction)."
    tol = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(v - value) <= tol or abs(100 * v - value) <= tol for v in vals)

def check(path:Path, shared:set)->list:
    "Problems of one notebook: `(cell, figure)` for each quoted figure that no source holds."
    nb = json.loads(path.read_text())
    own = set()
    for c in nb['cells']:
        if c['cell_type'] == 'code': own |= numbers(''.join(c['source'])) | numbers(output_text(c))
    vals = shared | own
    bad = []
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'markdown': continue
        for text, v, d in figures(''.join(c['source'])):
            if not agrees(v, d, vals): bad.append((i, text))
    return bad

def main(paths:list)->int:
    shared = shared_sources()
    paths = [Path(p) for p in paths] or sorted(p for p in (root/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    bad = [(p, i, t) for p in paths for i, t in check(p, shared)]
    if bad:
        print("Figures in prose that no result file, output or code of the notebook holds (render them from their file, or remove them):")
        for p, i, t in bad: print(f"   {p.relative_to(root) if p.is_absolute() else p}, cell {i}: {t!r}")
        return 1
    print("every measured figure quoted in the notebooks' prose agrees with a committed source")
    return 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
