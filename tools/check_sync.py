"""Fail if `nbdev-clean`, `nbdev-export` or the README generator would change any file.

Run by `make test`: the notebooks are the source, so the package, the cleaned notebooks and README.md
must be exactly what the tools make of them. Files are hashed before and after; nothing is reverted,
so after a failure `git diff` shows what the tools changed (commit it, or fix the notebook).
"""
import hashlib, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
bin_ = Path(sys.executable).parent

def snapshot():
    files = [*root.glob('nbs/**/*.ipynb'), *root.glob('otkd_nb/**/*.py'), root/'README.md']
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
            for f in files if '.ipynb_checkpoints' not in f.parts}

before = snapshot()
for cmd in ([bin_/'nbdev-clean'], [bin_/'nbdev-export'], [sys.executable, root/'tools'/'readme.py']):
    subprocess.run([str(c) for c in cmd], cwd=root, check=True)
after = snapshot()
changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
if changed:
    print("Out of sync: these files change when the notebooks are cleaned/exported or README.md is regenerated:")
    for f in changed: print("  ", f)
    print("Run `make export`, review `git diff`, and commit the result.")
    sys.exit(1)
print("notebooks, package and README.md are in sync")
