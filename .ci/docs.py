"""Build the static site in docs/ from the notebooks (nbdev_docs needs quarto, which is not installable here).

One HTML page per notebook (hidden cells dropped, outputs kept) and docs/index.html from nbs/index.ipynb.
Usage: python .ci/docs.py [--check]   (--check: exit 1 if docs/ is not current)"""
import sys, html
from pathlib import Path
from nbconvert import HTMLExporter
sys.path.insert(0, str(Path(__file__).parent))
from nbtools import shown, lesson_notebooks

def page_name(nb): return 'index.html' if nb.stem == 'index' else nb.stem + '.html'

def render():
    nbs = lesson_notebooks()
    nav = ''.join(f'<li><a href="{page_name(nb)}">{html.escape(nb.stem)}</a></li>' for nb in nbs)
    nav = f'<nav style="padding:0.5em 2em;border-bottom:1px solid #ddd"><ul style="display:flex;flex-wrap:wrap;gap:1.2em;list-style:none;margin:0;padding:0">{nav}</ul></nav>'
    exporter = HTMLExporter(template_name='lab')
    pages = {}
    for nb in nbs:
        body, _ = exporter.from_notebook_node(shown(nb))
        pages[page_name(nb)] = body.replace('<main>', '<main>' + nav, 1)
    return pages

if __name__ == '__main__':
    pages, out = render(), Path('docs')
    if '--check' in sys.argv:
        stale = [n for n, t in pages.items() if not (out/n).exists() or (out/n).read_text() != t]
        extra = [p.name for p in out.glob('*.html') if p.name not in pages]
        if stale or extra: sys.exit(f'docs/ is out of date ({", ".join(stale + extra)}): run `python .ci/docs.py` and commit it')
    else:
        out.mkdir(exist_ok=True)
        for p in out.glob('*.html'):
            if p.name not in pages: p.unlink()
        for n, t in pages.items(): (out/n).write_text(t)
