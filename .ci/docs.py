"""Build the static site in docs/ from the notebooks (nbdev_docs needs quarto, which is not installable here).

One HTML page per notebook (hidden cells dropped, outputs kept), docs/index.html from nbs/index.ipynb, and the
style sheet and script they share.
Usage: python .ci/docs.py [--check]   (--check: exit 1 if docs/ is not current)"""
import sys, html, re
from pathlib import Path
from nbconvert import HTMLExporter
sys.path.insert(0, str(Path(__file__).parent))
from nbtools import shown, lesson_notebooks

def page_name(nb): return 'index.html' if nb.stem == 'index' else nb.stem + '.html'

STYLE = re.compile(r'<style[^>]*>(.*?)</style>\s*', re.S)
MODULE = re.compile(r'<script type="module">(.*?)</script>', re.S)

def share_blocks(pages, pattern, shared_name, link):
    "Move the blocks (`pattern`'s group 1) every HTML page has into `shared_name`, linked once from each page."
    html_pages = {n: t for n, t in pages.items() if n.endswith('.html')}
    blocks = [pattern.findall(t) for t in html_pages.values()]
    common = [b for b in blocks[0] if all(b in bl for bl in blocks[1:])]
    if not common: return pages
    def strip(text):
        first = True
        def swap(m):
            nonlocal first
            if m.group(1) not in common: return m.group(0)
            out, first = (link if first else ''), False
            return out
        return pattern.sub(swap, text)
    return {**pages, **{n: strip(t) for n, t in html_pages.items()}, shared_name: '\n'.join(common)}

def title(nb):
    "The notebook's first `# ` heading (the page title), or its metadata name."
    for c in nb.cells:
        if c.cell_type == 'markdown' and (m := re.search(r'^# (.+)$', c.source, re.M)): return m.group(1).strip()
    return nb.metadata.get('name', 'small-doge')

def render():
    nbs = lesson_notebooks()
    nav = ''.join(f'<li><a href="{page_name(nb)}">{html.escape(nb.stem)}</a></li>' for nb in nbs)
    nav = f'<nav style="padding:0.5em 2em;border-bottom:1px solid #ddd"><ul style="display:flex;flex-wrap:wrap;gap:1.2em;list-style:none;margin:0;padding:0">{nav}</ul></nav>'
    exporter = HTMLExporter(template_name='lab')
    pages = {}
    for nb in nbs:
        node = shown(nb)
        body, _ = exporter.from_notebook_node(node, resources={'metadata': {'name': f'{title(node)} - small-doge'}})
        pages[page_name(nb)] = body.replace('<main>', '<main>' + nav, 1)
    # nbconvert inlines thousands of lines of CSS (and a diagram loader) into every page: share them instead
    pages = share_blocks(pages, STYLE, 'style.css', '<link rel="stylesheet" href="style.css">\n')
    return share_blocks(pages, MODULE, 'page.js', '<script type="module" src="page.js"></script>')

if __name__ == '__main__':
    pages, out = render(), Path('docs')
    if '--check' in sys.argv:
        stale = [n for n, t in pages.items() if not (out/n).exists() or (out/n).read_bytes().decode() != t]
        extra = [p.name for p in out.glob('*.*') if p.name not in pages]
        if stale or extra: sys.exit(f'docs/ is out of date ({", ".join(stale + extra)}): run `python .ci/docs.py` and commit it')
    else:
        out.mkdir(exist_ok=True)
        for p in out.glob('*.*'):
            if p.name not in pages: p.unlink()
        for n, t in pages.items(): (out/n).write_text(t)
