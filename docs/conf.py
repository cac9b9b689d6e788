# Sphinx configuration of the documentation site. Sources are staged by tools/build_docs.py (`make docs`) from
# nbdev's processed notebooks; nothing here fetches anything: MathJax is copied from a local package.
import importlib.util, shutil
try: import tomllib
except ModuleNotFoundError: import tomli as tomllib  # Python 3.10
from pathlib import Path

_root = Path(__file__).resolve().parent.parent
_proj = tomllib.loads((_root/'pyproject.toml').read_text(encoding='utf-8'))['project']

project = _proj['name']
author = _proj['authors'][0]['name']
copyright = f'otkd_nb developers, {_proj["license"]}'
html_title = project
html_baseurl = _proj.get('urls', {}).get('Documentation', '')

extensions = ['myst_nb', 'sphinx.ext.mathjax', 'sphinx.ext.githubpages']
root_doc = 'index'
exclude_patterns = ['**.ipynb_checkpoints']
source_suffix = {'.ipynb': 'myst-nb', '.md': 'myst-nb'}

# MyST-NB: show the outputs stored in the notebooks, never run them
nb_execution_mode = 'off'
nb_render_markdown_format = 'myst'     # show_doc output is markdown: signature, docstring and argument table
nb_ipywidgets_js = {}                  # no widget manager from a CDN (widgets are replaced by a note when staging)
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'amsmath', 'attrs_block', 'attrs_inline', 'colon_fence']
myst_heading_anchors = 3
suppress_warnings = ['myst.header', 'mystnb.unknown_mime_type']

html_theme = 'furo'
html_static_path = ['_static']
html_css_files = ['otkd.css']
html_favicon = '_static/favicon.svg'
html_copy_source = False
html_show_sourcelink = False
pygments_style = 'friendly'

# MathJax 3 from the django-static-mathjax package (the official mathjax-full 3.2.2 distribution), served from _static
mathjax_path = 'mathjax/tex-chtml.js'
_MJ_PARTS = ['tex-chtml.js', 'input', 'output/chtml.js', 'output/chtml', 'ui', 'a11y', 'adaptors', 'sre']

def _mathjax_dir():
    spec = importlib.util.find_spec('mathjax')
    d = Path(spec.origin).parent/'static'/'mathjax' if spec and spec.origin else None
    if not d or not (d/'es5'/'tex-chtml.js').exists():
        raise RuntimeError("MathJax files not found: pip install django-static-mathjax (the docs extra of pyproject.toml)")
    return d

def _copy_mathjax(app, exc):
    if exc is not None or app.builder.format != 'html': return
    src, dest = _mathjax_dir(), Path(app.outdir)/'_static'/'mathjax'
    for part in _MJ_PARTS:
        s, d = src/'es5'/part, dest/part
        if s.is_dir(): shutil.copytree(s, d, dirs_exist_ok=True)
        else: d.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(s, d)
    shutil.copy2(src/'LICENSE', dest/'LICENSE')

def setup(app):
    _mathjax_dir()  # fail early, before a long build
    app.connect('build-finished', _copy_mathjax)
