"""The course site as a reader meets it: built by its one command, served on 127.0.0.1, read in headless Chromium
with every request to another host blocked (an offline reader).

Screenshots of the landing page and lesson 05 are saved to $SMALL_DOGE_ARTEFACTS, else $SMALL_DOGE_HOME/artefacts
(.ci/run: .ci-home/artefacts), else this run's pytest temp folder; the path is printed at the end."""
import ast, functools, os, re, shutil, subprocess, sys, threading, urllib.parse, urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'.ci'))
from nbtools import lesson_notebooks, read_nb

CHROMIUM = os.environ.get('CHROMIUM') or shutil.which('chromium') or shutil.which('chromium-browser') or '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--no-first-run', '--disable-dev-shm-usage']
LESSONS = [p for p in lesson_notebooks(ROOT/'nbs') if p.stem != 'index']

def page_of(nb): return re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb.stem.lower()) + '.html'

def plots(nb):
    "Does the notebook keep a figure among its outputs?"
    return any(mime.startswith('image/') for c in read_nb(nb).cells if c.cell_type == 'code'
               for o in c.get('outputs', []) for mime in o.get('data', {}))

# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')
    r = subprocess.run([sys.executable, str(ROOT/'.ci/docs.py'), '--out', str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out

@pytest.fixture(scope='module')
def server(site):
    "A static server on 127.0.0.1 (a free port) that records every request's status."
    log = []
    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, code='-', size='-'): log.append((self.path, int(code) if str(code).isdigit() else code))
        def log_message(self, *a): pass
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/', log
    httpd.shutdown()
    httpd.server_close()

@pytest.fixture(scope='module')
def artefacts(tmp_path_factory):
    home = os.environ.get('SMALL_DOGE_HOME')
    d = Path(os.environ.get('SMALL_DOGE_ARTEFACTS') or (Path(home)/'artefacts' if home else tmp_path_factory.mktemp('docs-artefacts')))
    d.mkdir(parents=True, exist_ok=True)
    return d

@pytest.fixture(scope='module')
def browser(tmp_path_factory, server):
    "Headless Debian chromium through Playwright; requests that leave 127.0.0.1 (or file://) are blocked and recorded."
    if not Path(CHROMIUM).exists(): pytest.skip(f'no chromium at {CHROMIUM}: `apt-get install -y chromium` (.ci/run does)')
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is in the dev requirements')
    base, _ = server
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp('chromium-profile')), headless=True,
                                                   executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                   viewport={'width': 1400, 'height': 1000})
        ctx.outside = []
        def gate(route):
            url = route.request.url
            if url.startswith(base) or url.startswith('file://') or url.startswith('data:'): route.continue_()
            else: ctx.outside.append(url); route.abort()
        ctx.route('**/*', gate)
        yield ctx
        ctx.close()

def open_page(ctx, url):
    "Load a page; return it with the console errors, page errors and failed requests seen while loading."
    page = ctx.new_page()
    page.problems = []
    page.on('console', lambda m: m.type == 'error' and page.problems.append(f'console: {m.text}'))
    page.on('pageerror', lambda e: page.problems.append(f'page error: {e}'))
    page.on('requestfailed', lambda r: page.problems.append(f'request failed: {r.url} {r.failure}'))
    page.on('response', lambda r: r.status >= 400 and page.problems.append(f'HTTP {r.status}: {r.url}'))
    page.goto(url, wait_until='load')
    page.wait_for_function("document.body.dataset.math", timeout=15000)   # site.js has typeset the formulas (or could not)
    if page.evaluate("document.body.dataset.math") != 'done': page.problems.append('KaTeX did not load')
    return page

# what the browser shows: raw TeX left in the text a reader sees, typeset formulas, figures, links
INSPECT = """() => {
  const raw = [];
  const walker = document.createTreeWalker(document.querySelector('main'), NodeFilter.SHOW_TEXT, {
    acceptNode: n => n.parentElement.closest('pre, code, script, style, .katex') ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  while (walker.nextNode()) {
    const t = walker.currentNode.textContent;
    if (/\\$\\$|\\$[^$\\s][^$]*\\$|\\\\\\(|\\\\\\[/.test(t)) raw.push(t.trim().slice(0, 120));
  }
  const imgs = [...document.querySelectorAll('main img')];
  return {
    raw, formulas: document.querySelectorAll('.katex').length, katexErrors: document.querySelectorAll('.katex-error').length,
    figures: document.querySelectorAll('main .out-img img').length,
    brokenImages: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  };
}"""

# ---------------------------------------------------------------- tests
def test_site_is_offline(site):
    "No asset the built site loads comes from the network (no CDN, no web fonts), and no page inlines its figures."
    remote = re.compile(r'''(?:<(?:script|img|iframe|source|video|audio|embed)\b[^>]*\bsrc|<link\b[^>]*\bhref)\s*=\s*["']?(?:https?:)?//''', re.I)
    css_remote = re.compile(r'''(?:url\(\s*["']?|@import\s+["']?)(?:https?:)?//''', re.I)
    for f in sorted(site.rglob('*')):
        if f.suffix == '.html':
            text = f.read_text()
            assert not remote.search(text), f'{f.name} loads {remote.search(text).group(0)}'
            assert 'src="data:image' not in text, f'{f.name} inlines a figure instead of linking img/'
            assert f.stat().st_size < 1_500_000, f'{f.name}: {f.stat().st_size} bytes'
        if f.suffix == '.css': assert not css_remote.search(f.read_text()), f'{f.name} loads from the network'
        if f.suffix == '.js':
            assert not re.search(r'''import\(\s*["']https?://''', f.read_text()), f'{f.name} imports from the network'
    pages = {p.name for p in site.glob('*.html')}
    assert {'index.html', 'api.html'} | {page_of(nb) for nb in LESSONS} <= pages

def test_lesson_pages_start_with_their_title(site):
    "The title and summary come first (the exported imports after them), and no cell shows an `In [ ]:` prompt."
    for nb in LESSONS:
        text = (site/page_of(nb)).read_text()
        main = text[text.index('<main'):]
        assert re.match(r'<main[^>]*>\s*<header class="lesson-head"><h1 id="top">', main), f'{page_of(nb)} does not open with its title'
        assert not re.search(r'\b(In|Out)\s*(&nbsp;|\s)*\[[ 0-9]*\]:', main), f'{page_of(nb)} shows prompts'

def test_api_reference_covers_every_exported_name(site):
    "Each name in a module's `__all__` has its entry: signature, the lesson that builds it, its source line."
    api = (site/'api.html').read_text()
    entries = dict(re.findall(r'<div class="doc" id="([^"]+)">(.*?)</pre>', api, re.S))
    names = []
    for py in sorted((ROOT/'small_doge').rglob('*.py')):
        tree = ast.parse(py.read_text())
        exported = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == '__all__' for t in n.targets)]
        mod = '.'.join(py.relative_to(ROOT/'small_doge').with_suffix('').parts)
        names += [f'{mod}.{name}' for name in (exported[0] if exported else [])]
    assert len(names) > 100
    missing = [n for n in names if n not in entries]
    assert not missing, f'no API entry for {missing[:10]}'
    for n in names:
        assert 'class="doc-lesson"' in entries[n] and 'class="doc-source" href="src/' in entries[n], n

def test_pages_in_chromium(site, server, browser, artefacts):
    base, log = server
    lessons = {page_of(nb): nb for nb in LESSONS}
    urls = ['index.html', *lessons, 'api.html', 'build.html', 'src/attention.html']
    links, problems = set(), []
    for rel in urls:
        page = open_page(browser, base + rel)
        seen = page.evaluate(INSPECT)
        problems += [f'{rel}: {p}' for p in page.problems]
        if seen['raw']: problems.append(f'{rel}: raw TeX {seen["raw"][:3]}')
        if seen['katexErrors']: problems.append(f'{rel}: {seen["katexErrors"]} formulas KaTeX could not typeset')
        if seen['brokenImages']: problems.append(f'{rel}: images that did not load {seen["brokenImages"]}')
        nb = lessons.get(rel)
        if nb is not None and plots(nb) and not seen['figures']: problems.append(f'{rel}: {nb.name} plots but shows no figure')
        if nb is not None and nb.stem.startswith('05_'):
            if seen['formulas'] < 10: problems.append(f'{rel}: lesson 05 typesets {seen["formulas"]} formulas')
            page.screenshot(path=str(artefacts/'lesson05.png'))
            page.locator('main .out-img img').first.scroll_into_view_if_needed()
            page.screenshot(path=str(artefacts/'lesson05-figure.png'))
        if rel == 'index.html':
            if not seen['formulas']: problems.append('index.html: no formula typeset')
            rows = page.locator('table.lesson-map tbody tr').count()
            if rows != len(LESSONS): problems.append(f'index.html: the lesson map has {rows} rows for {len(LESSONS)} lessons')
            page.screenshot(path=str(artefacts/'landing.png'))
            page.locator('table.lesson-map').scroll_into_view_if_needed()
            page.screenshot(path=str(artefacts/'landing-lesson-map.png'))
        links |= {l for l in seen['links'] if l.startswith(base)}
        page.close()
    assert not browser.outside, f'pages tried to load from the network: {sorted(set(browser.outside))[:5]}'
    assert not problems, '\n'.join(problems[:30])
    assert all(code < 400 for _, code in log), [r for r in log if r[1] >= 400][:10]
    # every internal link resolves, and so does its #anchor
    ids = {}
    for link in sorted(links):
        path, _, frag = link.partition('#')
        if path not in ids:
            with urllib.request.urlopen(path) as r:
                assert r.status == 200, link
                body = r.read().decode('utf-8', 'replace') if path.endswith(('.html', '/')) else ''
            ids[path] = set(re.findall(r'\bid="([^"]+)"', body))
        # as browsers match a fragment: as written, then percent-decoded
        if frag: assert {frag, urllib.parse.unquote(frag)} & ids[path], f'{link}: no element with id {frag!r}'
    assert len(links) > 100
    print(f'\nscreenshots in {artefacts}: ' + ', '.join(sorted(p.name for p in artefacts.glob('*.png'))))

@pytest.mark.parametrize('where', ['server', 'file'])
def test_search_finds_api_entry(site, server, browser, where):
    base, _ = server
    page = open_page(browser, base + 'index.html' if where == 'server' else (site/'index.html').as_uri())
    page.fill('#search', 'dynamic_mask_attention')
    first = page.locator('#search-results a.hit').first
    first.wait_for(timeout=5000)
    assert first.locator('.hit-kind').inner_text().lower() == 'api'
    assert first.get_attribute('href').endswith('api.html#attention.dynamic_mask_attention')
    first.click()
    page.wait_for_url('**/api.html#attention.dynamic_mask_attention')
    entry = page.locator('[id="attention.dynamic_mask_attention"]')
    assert entry.is_visible() and 'dynamic_mask_attention(' in entry.locator('.doc-sig').inner_text()
    assert 'lesson 05' in entry.locator('.doc-lesson').inner_text()
    # lessons are found by what they teach, not only by name
    page.fill('#search', 'rotary')
    page.locator('#search-results a.hit').first.wait_for(timeout=5000)
    assert any('rope.html' in (a.get_attribute('href') or '') for a in page.locator('#search-results a.hit').all())
    assert not page.problems, page.problems
    page.close()
