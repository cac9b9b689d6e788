"""The documentation site: built offline by tools/build_docs.py (as `make docs` does) into a temporary folder, served
on 127.0.0.1 and checked in headless Chromium (Debian's chromium and chromium-driver, driven by selenium).

Checked on every page: no severe console message (a failed request shows up as one), every image loaded, every link
inside the site points to a file of the site (and to an element of it when it has an anchor), MathJax rendered
the math where there is some; the site's search finds `IPOTCallback`. Screenshots of the home page and the IPOT
page go to _docs_artifacts/ (and /tmp/otkd_docs_*.png); the timings to _docs_artifacts/timings.txt.
"""
import functools, os, shutil, subprocess, sys, threading, time
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit, unquote
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT/'_docs_artifacts'
BROWSERS = ['/usr/lib/chromium/chromium', '/usr/bin/chromium']  # the real binary first: the wrapper script adds flags
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--window-size=1280,1000']

def _chromium():
    "(browser, driver) paths; installs Debian's chromium and chromium-driver when missing and root, else skips with the reason"
    def found():
        b, d = next((p for p in BROWSERS if os.access(p, os.X_OK)), None), shutil.which('chromedriver')
        return (b, d) if b and d else None
    if res := found(): return res
    if os.geteuid() != 0 or not shutil.which('apt-get'):
        pytest.skip("headless Chromium is not installed and this is not root: apt-get install chromium chromium-driver")
    try:
        subprocess.run('apt-get update -qq && apt-get install -y -qq chromium chromium-driver', shell=True, check=True,
                       timeout=900, capture_output=True, env={**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'})
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"could not install Debian's chromium and chromium-driver: {e}")
    if res := found(): return res
    pytest.skip("chromium or chromedriver still missing after apt-get install")

class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "Build the site into a temporary folder; serve it on 127.0.0.1; yield (folder, base URL, timings)"
    for mod in ('sphinx', 'myst_nb', 'furo'):
        pytest.importorskip(mod, reason="the docs extra is not installed: pip install -e '.[docs]'")
    build_s = 0.0
    if os.environ.get('OTKD_DOCS_SITE'): out = Path(os.environ['OTKD_DOCS_SITE'])  # check a site built before, e.g. _docs
    else:
        tmp = tmp_path_factory.mktemp('docs')
        out = tmp/'site'
        t = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--out', str(out), '--work', str(tmp/'work')],
                           cwd=ROOT, capture_output=True, text=True, timeout=1800)
        build_s = time.perf_counter() - t
        assert r.returncode == 0, f"docs build failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
        warnings = [l for l in r.stderr.splitlines() if 'WARNING:' in l]
        assert not warnings, "Sphinx warnings:\n" + '\n'.join(warnings[:30])
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(out)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True); th.start()
    yield out, f'http://127.0.0.1:{httpd.server_address[1]}/', {'build_s': build_s}
    httpd.shutdown(); httpd.server_close()

@pytest.fixture(scope='module')
def browser():
    webdriver = pytest.importorskip('selenium.webdriver', reason="selenium is not installed: pip install -e '.[docs]'")
    from selenium.webdriver.chrome.service import Service
    binary, driver_path = _chromium()
    os.environ.setdefault('SE_OFFLINE', 'true')  # selenium-manager must not try to download a browser or a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in FLAGS: opts.add_argument(f)
    profile = Path(os.environ.get('TMPDIR', '/tmp'))/f'otkd-chromium-{os.getpid()}'
    shutil.rmtree(profile, ignore_errors=True)
    opts.add_argument(f'--user-data-dir={profile}')
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    drv.set_page_load_timeout(60); drv.set_script_timeout(60)
    yield drv
    drv.quit(); shutil.rmtree(profile, ignore_errors=True)

_WAIT_JS = """const done = arguments[arguments.length - 1];
const imgs = Array.from(document.images);
imgs.forEach(i => { i.loading = 'eager'; });
const mj = (window.MathJax && MathJax.startup && MathJax.startup.promise) ? MathJax.startup.promise : Promise.resolve();
Promise.allSettled([mj, ...imgs.map(i => i.decode())]).then(() => done(true));"""

_PAGE_JS = """return {
  bad_images: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.currentSrc || i.src),
  n_images: document.images.length,
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name')),
  math: document.querySelectorAll('.math').length,
  mjx: document.querySelectorAll('mjx-container').length,
  mjx_errors: document.querySelectorAll('mjx-merror').length,
  tables: document.querySelectorAll('table').length,
  title: document.title };"""

def _full_screenshot(drv, path):
    "A screenshot of the whole page (capped at 16000 px) through the DevTools protocol"
    import base64
    w, h = drv.execute_script('return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]')
    shot = drv.execute_cdp_cmd('Page.captureScreenshot', {'format': 'png', 'captureBeyondViewport': True,
                               'clip': {'x': 0, 'y': 0, 'width': w, 'height': min(h, 16000), 'scale': 1}})
    path.write_bytes(base64.b64decode(shot['data']))

def _site_file(out, base, url):
    "The file of the site that `url` names, or None when `url` is not inside the site"
    if not url.startswith(base): return None
    p = unquote(urlsplit(url).path)[len(urlsplit(base).path):]
    f = out/p
    return f/'index.html' if (not p or p.endswith('/') or f.is_dir()) else f

def test_site_in_browser(browser, site):  # the browser first: skip before building when there is none
    out, base, timings = site
    t0 = time.perf_counter()
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob('*.html') if not p.relative_to(out).parts[0].startswith('_'))
    from nbdev.config import nbpath2html
    nbs = ROOT/'nbs'
    expected = {nbpath2html(p.relative_to(nbs)).as_posix() for p in nbs.rglob('*.ipynb')  # one page per notebook, tutorials too
                if not any(part.startswith(('.', '_')) for part in p.relative_to(nbs).parts)}
    expected |= {'index.html', 'cost.html', 'ipot.html', 'callbacks.html'}
    assert not (missing := sorted(expected - set(pages))), f"pages missing: {missing}"
    problems, ids, links, stats = [], {}, [], {}
    ARTIFACTS.mkdir(exist_ok=True)
    browser.get_log('browser')
    for page in pages:
        browser.get(base + page)
        browser.execute_async_script(_WAIT_JS)
        info = browser.execute_script(_PAGE_JS)
        stats[page] = info
        logs = [l for l in browser.get_log('browser') if l['level'] == 'SEVERE']
        problems += [f"{page}: console: {l['message']}" for l in logs]
        problems += [f"{page}: image did not load: {u}" for u in info['bad_images']]
        if info['math']:
            if not info['mjx']: problems.append(f"{page}: {info['math']} math elements but MathJax rendered none")
            if info['mjx_errors']: problems.append(f"{page}: {info['mjx_errors']} MathJax errors")
        ids[page] = set(info['ids'])
        links += [(page, u) for u in info['links']]
        if page in ('index.html', 'ipot.html'):
            shot = ARTIFACTS/f"{page.replace('.html', '')}.png"
            _full_screenshot(browser, shot)
            shutil.copy(shot, f"/tmp/otkd_docs_{shot.name}")
    for page, url in links:
        f = _site_file(out, base, url)
        if f is None: continue
        if not f.exists(): problems.append(f"{page}: broken link {url}"); continue
        frag = unquote(urlsplit(url).fragment)
        rel = f.relative_to(out).as_posix()
        if frag and rel in ids and frag not in ids[rel]: problems.append(f"{page}: link to a missing anchor {url}")
    # math really is rendered on the pages that teach it
    for page in ('cost.html', 'ipot.html'):
        assert stats[page]['mjx'] > 0, f"no MathJax output on {page}"
    assert stats['ipot.html']['n_images'] > 0, "the IPOT page shows no plot"
    assert stats['callbacks.html']['tables'] > 0, "no argument tables on the callbacks page"
    # the site's own search, run in the browser
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(base + 'search.html?q=IPOTCallback')
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.querySelectorAll('#search-results li').length > 0 || "
        "/found|no documents/i.test((document.querySelector('#search-results p, .search-summary') || {}).textContent || '')"))
    hits = browser.execute_script("return Array.from(document.querySelectorAll('#search-results li a')).map(a => a.href)")
    problems += [f"search: console: {l['message']}" for l in browser.get_log('browser') if l['level'] == 'SEVERE']
    if not any('callbacks.html' in h for h in hits): problems.append(f"search for IPOTCallback did not list callbacks.html: {hits}")
    check_s = time.perf_counter() - t0
    report = (f"build {timings['build_s']:.1f} s, browser check {check_s:.1f} s, {len(pages)} pages, "
              f"{sum(s['n_images'] for s in stats.values())} images, {len(links)} links; search hits: {len(hits)}\n")
    (ARTIFACTS/'timings.txt').write_text(report)
    print('\n' + report + f"screenshots: {ARTIFACTS}/index.png, {ARTIFACTS}/ipot.png (copied to /tmp/otkd_docs_*.png)")
    order = ('broken link', 'missing anchor', 'image', 'MathJax', 'math', 'search', 'console')  # the console echoes the others
    problems.sort(key=lambda p: next((i for i, k in enumerate(order) if k in p), len(order)))
    assert not problems, f"{len(problems)} problems:\n" + '\n'.join(problems[:60])
