"""Fail where the package's layout breaks the house rules of CONTRIBUTING (nbs/contributing.ipynb).

Run by `make test` (through tools/check_sync.py):

- a module of `otkd_nb/` over 400 lines (split it by concern, one notebook per module);
- an export cell over 40 lines (grow a class across cells with fastcore's `@patch`; one function per cell);
- a private name (`_name`) imported from another module of the package (make it public and documented, or move it);
- a module that imports one that comes after it in reading order (the notebooks' order).

    python tools/check_layout.py
"""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
MAX_MODULE, MAX_CELL = 400, 40
IMPORT = re.compile(r'^\s*from\s+(?:\.|otkd_nb\.)(\w+)\s+import\s+\(?([^)\n]*(?:\n[^)\n]*)*?)\)?\s*$', re.M)

def module_order()->dict:
    "Each module's position in reading order: the position of the notebook that exports it."
    order = {}
    for i, nb in enumerate(sorted((root/'nbs').glob('*.ipynb'))):
        for c in json.loads(nb.read_text())['cells']:
            m = re.match(r'#\|\s*default_exp\s+(\S+)', ''.join(c['source']))
            if m: order.setdefault(m.group(1), i)
    return order

def problems()->list:
    out, order = [], module_order()
    for f in sorted((root/'otkd_nb').glob('*.py')):
        if f.name in ('_modidx.py', '__init__.py'): continue
        text = f.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE: out.append(f"otkd_nb/{f.name}: {n} lines (at most {MAX_MODULE})")
        for m in IMPORT.finditer(text):
            mod, names = m.group(1), m.group(2)
            private = [x.strip() for x in re.split(r'[,\s]+', names) if x.strip().startswith('_') and x.strip() != '__version__']
            if private: out.append(f"otkd_nb/{f.name} imports private {', '.join(private)} from otkd_nb.{mod}")
            me = f.stem
            if mod in order and me in order and order[mod] > order[me]:
                out.append(f"otkd_nb/{f.name} imports otkd_nb.{mod}, which comes after it in reading order")
    for nb in sorted((root/'nbs').rglob('*.ipynb')):
        if '.ipynb_checkpoints' in nb.parts: continue
        for i, c in enumerate(json.loads(nb.read_text())['cells']):
            src = ''.join(c['source'])
            if c['cell_type'] == 'code' and re.match(r'#\|\s*export\b', src):
                n = len(src.splitlines())
                if n > MAX_CELL: out.append(f"{nb.relative_to(root)}, cell {i}: an export cell of {n} lines (at most {MAX_CELL})")
    return out

def main()->int:
    bad = problems()
    if bad:
        print("The package's layout breaks the house rules (see nbs/contributing.ipynb):")
        for b in bad: print("  ", b)
        return 1
    print(f"modules within {MAX_MODULE} lines, export cells within {MAX_CELL}, no private names or later modules imported")
    return 0

if __name__ == '__main__': sys.exit(main())
