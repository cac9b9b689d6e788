"""Fail if `nbdev-clean`, `nbdev-export`, the output cleaner or the README generator would change any file, or if a saved output is dirty.

Run by `make test`: the notebooks are the source, so the package, the cleaned notebooks and README.md
must be exactly what the tools make of them. Files are hashed before and after; nothing is reverted,
so after a failure `git diff` shows what the tools changed (commit it, or fix the notebook). Saved outputs must be clean
(`tools/clean_outputs.py`: no ANSI codes, progress-bar residue or absolute temporary paths), and every measured figure
quoted in the notebooks' prose must agree with a committed result file or the notebook's own outputs (`tools/check_numbers.py`).
The package keeps the house layout (`tools/check_layout.py`: modules within 400 lines, export cells within 40, no private or
backward imports between modules).
"""
import hashlib, json, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
bin_ = Path(sys.executable).parent

def snapshot():
    files = [*root.glob('nbs/**/*.ipynb'), *root.glob('otkd_nb/**/*.py'), root/'README.md']
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
            for f in files if '.ipynb_checkpoints' not in f.parts}

before = snapshot()
for cmd in ([bin_/'nbdev-clean'], [sys.executable, root/'tools'/'clean_outputs.py'], [bin_/'nbdev-export'], [sys.executable, root/'tools'/'readme.py']):
    subprocess.run([str(c) for c in cmd], cwd=root, check=True)
after = snapshot()
changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
if changed:
    print("Out of sync: these files change when the notebooks are cleaned/exported or README.md is regenerated:")
    for f in changed: print("  ", f)
    print("Run `make export`, review `git diff`, and commit the result.")
    sys.exit(1)
sys.path.insert(0, str(root/'tools'))
from clean_outputs import problems
dirty = [(f.relative_to(root), p) for f in sorted(root.glob('nbs/**/*.ipynb')) if '.ipynb_checkpoints' not in f.parts
         for p in problems(json.loads(f.read_text()))]
if dirty:
    print("Dirty outputs (re-run the cell, or clean the output by hand):")
    for f, (cell, what) in dirty: print(f"   {f}, cell {cell}: {what}")
    sys.exit(1)
from check_numbers import main as check_numbers
if check_numbers([]): sys.exit(1)
from check_layout import main as check_layout
if check_layout(): sys.exit(1)
print("notebooks, package and README.md are in sync; saved outputs are clean")
