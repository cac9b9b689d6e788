"""Build the documentation site from nbs/ into _docs/, offline (`make docs`).

1. nbdev processes the notebooks exactly as for `nbdev-docs` (`nbdev.serve.proc_nbs` into `_proc/`: front matter,
   `show_doc` for exported cells, `#| hide` / `#| echo: false` / `#| export` directives, doc links).
2. The processed notebooks are staged for Sphinx + MyST-NB (`_docs_build/src/`): Quarto cell options become MyST-NB
   tags, pages take nbdev's names (`00_cost.ipynb` -> `cost.html`, as on a Quarto site, so nbdev's doc links
   resolve), `show_doc` output gets fastcore's argument table, links to this site become relative, a few torch /
   POT / fastai names link to their docs, and interactive widgets (which need a live kernel) get a note.
3. Sphinx (theme: furo) renders the stored outputs (`nb_execution_mode = 'off'`) into `_docs/`; MathJax is copied
   from the `django-static-mathjax` package into `_docs/_static/mathjax` (see docs/conf.py): nothing is fetched.

Every notebook under nbs/tutorials/ is picked up, in file-name order. Usage:
`python tools/build_docs.py [--out _docs] [--work _docs_build] [--workers 2] [--force]`.
"""
from __future__ import annotations
import argparse, ast, html, io, json, os, re, shutil, sys, time, tokenize, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT/'docs'

# ---------------------------------------------------------------------------------------------------------------
# 1. nbdev's processing

def process_notebooks(nbs: Path, workers: int, force: bool = False) -> Path:
    "Run nbdev's own docs processing of `nbs` (as `nbdev-docs` does before Quarto); returns the `_proc` folder."
    os.chdir(ROOT)  # nbdev finds pyproject.toml from the working directory
    from nbdev.serve import proc_nbs
    try: return Path(proc_nbs(str(nbs), n_workers=workers, force=force))
    except Exception as e:
        msg = str(e).strip()
        raise SystemExit(f"\nnbdev could not process the notebooks for the docs (nbdev-docs would fail the same way):\n\n{msg}\n\n"
                         "To render show_doc, nbdev runs only the exported cells, the show_doc cells and the cells that contain "
                         "an import statement (even one inside a function), not the cells in between. So: put imports in cells "
                         "of their own (a cell that mixes them with other code runs without the variables the skipped cells "
                         "define: nbdev's FAQ), and mark `#| eval: false` an exported cell that must not run when imported "
                         "(e.g. `if __name__ == '__main__': ...`).") from None

# ---------------------------------------------------------------------------------------------------------------
# 2. Staging: processed notebooks -> MyST-NB notebooks

def page_name(rel: Path) -> str:
    "nbdev's (and Quarto's) page name for a notebook path relative to nbs/: `tutorials/01_x.ipynb` -> `tutorials/x`"
    from nbdev.config import nbpath2html
    return nbpath2html(rel).with_suffix('').as_posix()

def src_text(s) -> str: return ''.join(s) if isinstance(s, list) else (s or '')

_re_fm = re.compile(r'^---\s*\n(.*?)\n---\s*$', re.DOTALL)
_re_opt = re.compile(r'^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_re_fence = re.compile(r'^\s*(```|~~~)')

def _md_segments(md: str):
    "Split markdown into (is_code, text) pieces: the rewriters leave fenced code blocks alone"
    out, buf, in_fence = [], [], False
    for line in md.splitlines(keepends=True):
        if _re_fence.match(line):
            if not in_fence: out.append((False, ''.join(buf))); buf = []
            buf.append(line); in_fence = not in_fence
            if not in_fence: out.append((True, ''.join(buf))); buf = []
        else: buf.append(line)
    out.append((in_fence, ''.join(buf)))
    return out

def _rewrite_prose(md: str, f) -> str: return ''.join(t if code else f(t) for code, t in _md_segments(md))

_CALLOUTS = {'note': 'note', 'tip': 'tip', 'warning': 'warning', 'important': 'important', 'caution': 'caution'}
_re_callout = re.compile(r'^:::\s*\{\.callout-(' + '|'.join(_CALLOUTS) + r')[^}]*\}\s*$', re.MULTILINE)

class Linker:
    "Rewrites links in markdown: this site's absolute URLs to relative ones, and a few external API names to their docs."
    # names that nbdev's lookup finds only when fully qualified; resolved through fastai's own nbdev index
    FASTAI = {'Learner': 'fastai.learner.Learner', 'DataLoaders': 'fastai.data.core.DataLoaders',
              'Callback': 'fastai.callback.core.Callback', 'Learner.fit_one_cycle': 'fastai.callback.schedule.Learner.fit_one_cycle',
              'fit_one_cycle': 'fastai.callback.schedule.Learner.fit_one_cycle', 'Learner.fit': 'fastai.learner.Learner.fit',
              'Learner.export': 'fastai.learner.Learner.export', 'set_seed': 'fastai.torch_core.set_seed'}

    def __init__(self, nbs: Path, anchors: dict | None = None):
        "`nbs`: the notebooks folder; `anchors`: page name -> the names its show_doc entries are anchored by"
        from nbdev.config import get_config
        self.nbs, self.anchors = nbs, anchors or {}
        from nbdev.doclinks import NbdevLookup
        cfg = get_config()
        host, base = cfg.get('doc_host', '') or '', cfg.get('doc_baseurl', '') or ''
        self.site = (host.rstrip('/') + '/' + base.strip('/')).rstrip('/') + '/' if host else None
        self.lookup = NbdevLookup()
        self.fastai = {k: u for k, q in self.FASTAI.items() if (u := self.lookup.doc(q))}

    @staticmethod
    def external(name: str) -> str | None:
        "Docs URL of a torch or POT name (`torch.save`, `nn.Module`, `F.cross_entropy`, `ot.emd2`, `ot.bregman.sinkhorn_log`)"
        n = name.removesuffix('()')
        if re.fullmatch(r'(torch|nn|F)(\.\w+)+', n):
            n = re.sub(r'^nn\.', 'torch.nn.', re.sub(r'^F\.', 'torch.nn.functional.', n))
            return f'https://docs.pytorch.org/docs/stable/generated/{n}.html'
        if m := re.fullmatch(r'ot\.(\w+)', n): return f'https://pythonot.github.io/all.html#ot.{m[1]}'
        if m := re.fullmatch(r'ot\.(\w+)\.(\w+)', n): return f'https://pythonot.github.io/gen_modules/ot.{m[1]}.html#ot.{m[1]}.{m[2]}'
        return None

    def _ext_sub(self, m):
        name = m[1]
        url = self.fastai.get(name.removesuffix('()')) or self.external(name)
        return f'[`{name}`]({url})' if url else m[0]

    @staticmethod
    def _a(text: str, href: str) -> str:
        "A raw HTML link: MyST would take a relative `[text](page.html)` for a missing document"
        text = re.sub(r'`([^`]+)`', r'<code class="docutils literal notranslate"><span class="pre">\1</span></code>', html.escape(text))
        return f'<a class="reference internal" href="{html.escape(href)}">{text}</a>'

    def _internal(self, m, prefix: str) -> str:
        "nbdev's link to a page of this site (`https://.../cost.html#cosine_cost`) made relative"
        target, _, frag = m[2].partition('#')
        shown = self.anchors.get(target.removesuffix('.html'))
        if frag and shown is not None and frag not in shown: return self._a(m[1], prefix + target)  # no show_doc there (private name)
        return self._a(m[1], prefix + m[2])

    def _notebook(self, m, rel: Path) -> str:
        "A relative link to a notebook (`../00_cost.ipynb`, which works in Jupyter and on Quarto sites) as a link to its page"
        target = Path(os.path.normpath(rel.parent/m[2]))
        if (target.parts and target.parts[0] == '..') or not (self.nbs/target).exists(): return m[0]  # left to MyST, which warns
        return self._a(m[1], os.path.relpath(page_name(target) + '.html', start=rel.parent.as_posix() or '.') + (m[3] or ''))

    def __call__(self, md: str, rel: Path) -> str:
        "Rewrite links in `md`, the markdown of the notebook at `rel` (relative to nbs/)."
        prefix = '../' * (len(rel.parts) - 1)
        def f(t):
            t = _re_callout.sub(lambda m: f':::{{{_CALLOUTS[m[1]]}}}', t)  # Quarto callouts as MyST admonitions
            t = re.sub(r'(?<![\[\w])`([\w.]+(?:\(\))?)`(?![\]\w])', self._ext_sub, t)
            if self.site: t = re.sub(r'\[([^\]\n]+)\]\(' + re.escape(self.site) + r'([^)\s]*)\)', lambda m: self._internal(m, prefix), t)
            t = re.sub(r'\[([^\]\n]+)\]\((?![a-zA-Z][\w+.-]*:|/|#)([^)\s#]+\.ipynb)(#[^)\s]*)?\)', lambda m: self._notebook(m, rel), t)
            return t
        return _rewrite_prose(md, f)

def _strip_comments(code: str) -> str:
    "Remove the docments comments from nbdev's signature block, then put it on one line when short"
    lines = code.splitlines()
    try:
        for t in tokenize.generate_tokens(io.StringIO(code + '\n  pass\n').readline):
            if t.type == tokenize.COMMENT and t.start[0] <= len(lines):
                r, c = t.start; lines[r-1] = lines[r-1][:c]
    except (tokenize.TokenError, IndentationError, SyntaxError): return code
    lines = [l.rstrip() for l in lines if l.strip()]
    if len(lines) > 2:
        one = lines[0] + ' '.join(l.strip() for l in lines[1:-1]) + lines[-1]
        one = re.sub(r',\s*\)', ')', one)
        if len(one) <= 100: return one
    return '\n'.join(lines)

_re_src_link = re.compile(r'\[source\]\((\S+?)\)\{[^}]*\}')
_re_sig = re.compile(r'```python\n(.*?)\n```', re.DOTALL)
_re_head = re.compile(r'^(#{1,6}) (\S+)\s*$', re.MULTILINE)

def _resolve(name: str, module: str | None):
    "The object `show_doc(name)` documented, found in `module` (where nbdev's source link points)"
    if not module: return None
    import importlib
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return eval(name, dict(vars(importlib.import_module(module))))
    except Exception: return None

def showdoc_md(md: str, name: str | None, default_module: str | None, linker: Linker) -> str:
    "Adapt nbdev's show_doc markdown: a plain source link, an anchor named like nbdev's, the signature, and fastcore's argument table."
    md = re.sub(r'^\s*---\s*\n', '<hr class="otkd-rule">\n\n', md, count=1)  # a docutils transition may not sit in an output
    src = _re_src_link.search(md)
    module = default_module
    if src:
        if m := re.search(r'/blob/[^/]+/(.+?)\.py#L\d+$', src[1]): module = m[1].replace('/', '.')
        md = md.replace(src[0], f'<a class="otkd-source" href="{src[1]}" target="_blank" rel="noopener">source</a>')
    if h := _re_head.search(md):  # nbdev's pages use the lower-cased name as anchor (cost.html#cosine_cost)
        md = md[:h.start()] + f'<span id="{h[2].lower()}" class="otkd-anchor"></span>\n\n' + md[h.start():]
    obj = _resolve(name, module) if name else None
    table = ''
    if obj is not None:
        from fastcore.docments import DocmentTbl
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                table = DocmentTbl(obj)._repr_markdown_()
        except Exception: table = ''
    if table:
        sig = _re_sig.search(md)
        if sig:  # the table carries the comments: keep the signature plain, then docstring, then the table
            md = md[:sig.start()] + f'```python\n{_strip_comments(sig[1])}\n```' + md[sig.end():]
        md = md.rstrip() + '\n\n' + linker.lookup.linkify(table) + '\n'
    return md

def _showdoc_name(code: str) -> str | None:
    "The symbol of a `show_doc(sym, ...)` cell"
    try: tree = ast.parse(code)
    except SyntaxError: return None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and getattr(node.value.func, 'id', '') == 'show_doc' and node.value.args:
            return ast.unparse(node.value.args[0])
    return None

def _default_exp(nb_path: Path) -> str | None:
    "`lib.module` named by the source notebook's `#| default_exp`"
    if not nb_path.exists(): return None
    from nbdev.config import get_config
    m = re.search(r'#\|\s*default_exp\s+(\S+)', nb_path.read_text(encoding='utf-8'))
    return f"{get_config().lib_path.name}.{m[1]}" if m else None

WIDGET = 'application/vnd.jupyter.widget-view+json'
WIDGET_NOTE = ('*An interactive widget appears here when the notebook runs in Jupyter '
               '(its sliders need a live Python kernel, which a static page does not have).*')

def _cell(cell_type, source, **kw):
    c = {'cell_type': cell_type, 'id': kw.pop('id', 'cell'), 'metadata': kw.pop('metadata', {}), 'source': source}
    if cell_type == 'code': c.update(execution_count=None, outputs=kw.pop('outputs', []))
    return c

def convert(nb: dict, rel: Path, linker: Linker, module: str | None) -> tuple[dict, str]:
    "Turn one nbdev-processed notebook into a MyST-NB notebook; returns it and its title."
    cells, title = [], None
    for c in nb['cells']:
        ct, src = c['cell_type'], src_text(c.get('source'))
        if ct == 'raw':
            m = _re_fm.match(src.strip())
            if not m: continue
            import yaml
            fm = yaml.safe_load(m[1]) or {}
            title = str(fm.get('title') or title or '')
            md = f"# {title}\n" if title else ''
            if fm.get('description'): md += f"\n{{.otkd-lead}}\n{fm['description']}\n"
            if md: cells.append(_cell('markdown', linker(md, rel)))
            continue
        if ct == 'markdown':
            if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
            cells.append(_cell('markdown', linker(src, rel))); continue
        if ct != 'code': continue
        opts, body = {}, []
        for line in src.splitlines():
            if m := _re_opt.match(line): opts[m[1]] = m[2].strip('"\'').lower()
            elif not line.startswith('#|'): body.append(line)
        if opts.get('include') == 'false': continue
        code = '\n'.join(body).strip('\n')
        tags = []
        if opts.get('echo') == 'false' or not code.strip(): tags.append('remove-input')
        if opts.get('output') == 'false': tags.append('remove-output')
        sd_name = _showdoc_name(code)
        outputs = []
        for o in c.get('outputs', []):
            o = dict(o)
            if o.get('output_type') == 'stream' and not src_text(o.get('text')).strip(): continue
            data = dict(o.get('data', {}))
            if WIDGET in data:  # an ipywidget: keep nothing that would need a kernel or a CDN
                outputs.append({'output_type': 'display_data', 'metadata': {}, 'data': {'text/markdown': WIDGET_NOTE}})
                continue
            if 'text/markdown' in data and 'text/html' not in data:
                md = src_text(data['text/markdown'])
                if sd_name: md = showdoc_md(md, sd_name, module, linker)
                data['text/markdown'] = linker(md, rel)
            if data: o['data'] = data
            outputs.append(o)
        if not outputs and 'remove-input' in tags: continue
        meta = {'tags': tags} if tags else {}
        cells.append(_cell('code', code, metadata=meta, outputs=outputs))
    meta = {k: v for k, v in nb.get('metadata', {}).items() if k in ('kernelspec', 'language_info')}
    meta.setdefault('kernelspec', {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'})
    for i, c in enumerate(cells): c['id'] = f'c{i:03d}'
    return {'cells': cells, 'metadata': meta, 'nbformat': 4, 'nbformat_minor': 5}, title or ''

def _write_if_changed(p: Path, text: str):
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists() or p.read_text(encoding='utf-8') != text: p.write_text(text, encoding='utf-8')

def stage(proc: Path, nbs: Path, src: Path) -> dict:
    "Write the Sphinx source tree `src` from nbdev's `proc` folder; returns the pages (name -> source and title)."
    nb_files = [p for p in sorted(proc.rglob('*.ipynb')) if not any(part.startswith(('.', '_')) for part in p.relative_to(proc).parts)]
    anchors = {}
    for p in nb_files:
        cells = json.loads(p.read_text(encoding='utf-8'))['cells']
        names = (_showdoc_name('\n'.join(l for l in src_text(c['source']).splitlines() if not l.startswith('#|')))
                 for c in cells if c['cell_type'] == 'code')
        anchors[page_name(p.relative_to(proc))] = {n.lower() for n in names if n}
    linker = Linker(nbs, anchors)
    pages, keep = {}, set()
    for p in sorted(proc.rglob('*')):
        rel = p.relative_to(proc)
        if any(part.startswith(('.', '_')) for part in rel.parts) or not p.is_file(): continue
        if p.suffix != '.ipynb':  # images and other files beside the notebooks
            if p.suffix in ('.yml', '.yaml', '.qmd', '.md'): continue
            dest = src/rel; dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists() or dest.stat().st_mtime < p.stat().st_mtime: shutil.copy2(p, dest)
            keep.add(dest); continue
        name = page_name(rel)
        nb = json.loads(p.read_text(encoding='utf-8'))
        out, title = convert(nb, rel, linker, _default_exp(nbs/rel))
        pages[name] = dict(rel=rel, title=title)
        dest = src/f'{name}.ipynb'
        if name == 'index': out['cells'].append(_cell('markdown', toctree_md(pages_order(proc)), id='toctree'))
        _write_if_changed(dest, json.dumps(out, indent=1, ensure_ascii=False) + '\n')
        keep.add(dest)
    for p in list(src.rglob('*')):  # notebooks that went away
        if p.is_file() and p not in keep: p.unlink()
    return pages

def pages_order(proc: Path) -> dict:
    "Navigation groups: tutorials/, the top-level (module) notebooks, then any other subfolder; each in file-name order"
    groups = {}
    for p in sorted(proc.rglob('*.ipynb'), key=lambda p: p.relative_to(proc).as_posix()):
        rel = p.relative_to(proc)
        if any(part.startswith(('.', '_')) for part in rel.parts) or rel.as_posix() == 'index.ipynb': continue
        key = rel.parts[0] if len(rel.parts) > 1 else ''
        groups.setdefault(key, []).append(page_name(rel))
    order = sorted(groups, key=lambda k: (k != 'tutorials', k != '', k))
    return {k: groups[k] for k in order}

def toctree_md(groups: dict) -> str:
    caps = {'': 'Modules', 'tutorials': 'Tutorials'}
    out = []
    for k, names in groups.items():
        cap = caps.get(k, k.replace('_', ' ').capitalize())
        out.append(f"```{{toctree}}\n:hidden:\n:caption: {cap}\n:maxdepth: 1\n\n" + '\n'.join(names) + "\n```")
    return '\n\n'.join(out)

# ---------------------------------------------------------------------------------------------------------------
# 3. Sphinx

def sphinx_build(src: Path, out: Path, doctrees: Path, quiet: bool = True) -> int:
    from sphinx.cmd.build import build_main
    args = ['-b', 'html', '-c', str(CONF_DIR), '-d', str(doctrees), '--keep-going', str(src), str(out)]
    if quiet: args.insert(0, '-q')
    return build_main(args)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--nbs', default=None, help='notebooks folder (default: nbs_path of pyproject.toml)')
    ap.add_argument('--out', default=str(ROOT/'_docs'), help='where the site goes (default: _docs)')
    ap.add_argument('--work', default=str(ROOT/'_docs_build'), help='Sphinx sources and doctrees (default: _docs_build)')
    ap.add_argument('--workers', type=int, default=min(2, os.cpu_count() or 1), help="nbdev's processes (default: 2)")
    ap.add_argument('--force', action='store_true', help="reprocess every notebook (nbdev's cache is by modification time)")
    a = ap.parse_args(argv)
    nbs, out, work = (Path(a.nbs).resolve() if a.nbs else None), Path(a.out).resolve(), Path(a.work).resolve()
    os.chdir(ROOT)
    from nbdev.config import get_config
    nbs = nbs or get_config().nbs_path
    t0 = time.perf_counter()
    proc = process_notebooks(nbs, a.workers, a.force)
    t1 = time.perf_counter()
    pages = stage(proc, nbs, work/'src')
    t2 = time.perf_counter()
    if (out/'.buildinfo').exists(): shutil.rmtree(out)  # a site of ours: rewrite it whole, so no page of a removed notebook stays
    rc = sphinx_build(work/'src', out, work/'doctrees')
    t3 = time.perf_counter()
    print(f"docs: {len(pages)} pages in {out} (nbdev processing {t1-t0:.1f} s, staging {t2-t1:.1f} s, sphinx {t3-t2:.1f} s)")
    return rc

if __name__ == '__main__': sys.exit(main())
