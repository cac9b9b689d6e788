"""Write README.md from nbs/index.ipynb, offline (nbdev-readme needs Quarto, which is not always installable).

Markdown cells are copied; code cells are shown as Python blocks followed by their text outputs; cells
marked `#| hide` are left out, `#| echo: false` shows only the output; directive lines are dropped.
Run by `make export`; `make test` checks that README.md is what this script writes.
"""
from pathlib import Path
from fastcore.nbio import read_nb

root = Path(__file__).resolve().parent.parent

def directives(src):
    return {l[3:].split(':')[0].strip(): l for l in src.splitlines() if l.startswith('#|')}

def text_output(o):
    if o.get('output_type') == 'stream': return ''.join(o['text'])
    d = o.get('data', {})
    if 'text/markdown' in d: return None, ''.join(d['text/markdown'])
    if 'text/plain' in d: return ''.join(d['text/plain'])
    return ''

def render(nb):
    parts = ["<!-- Generated from nbs/index.ipynb by tools/readme.py (`make export`); edit the notebook, not this file. -->"]
    for c in nb.cells:
        src = ''.join(c.source) if isinstance(c.source, list) else c.source
        if c.cell_type == 'markdown': parts.append(src.strip()); continue
        ds = directives(src)
        if 'hide' in ds or 'exporti' in ds: continue
        code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
        if code and not ('echo' in ds and 'false' in ds['echo']): parts.append(f"```python\n{code}\n```")
        for o in c.get('outputs', []):
            t = text_output(o)
            if isinstance(t, tuple): parts.append(t[1].strip())
            elif t.strip(): parts.append("```\n" + t.rstrip() + "\n```")
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    (root/'README.md').write_text(render(read_nb(root/'nbs'/'index.ipynb')))
