"Shared by readme.py and docs.py: read a notebook the way nbdev shows it (hidden cells dropped, directives stripped)."
import re, warnings
from pathlib import Path
import nbformat

DIRECTIVE = re.compile(r'^\s*#\|\s*(.*)$')

def directives(src):
    return [m.group(1).strip() for line in src.splitlines() if (m := DIRECTIVE.match(line))]

def read_nb(nb_path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # nbdev_clean strips cell ids on purpose
        return nbformat.read(nb_path, as_version=4)

def shown_cells(nb_path):
    "(cell, its directives) for each cell nbdev shows: `#| hide` / `#| default_exp` cells dropped, `#|` lines stripped."
    out = []
    for c in read_nb(nb_path).cells:
        ds = directives(c.source)
        if any(d.split()[0] in ('hide', 'default_exp') for d in ds if d): continue
        if c.cell_type == 'code':
            c.source = '\n'.join(l for l in c.source.splitlines() if not DIRECTIVE.match(l)).strip('\n')
            if any(d.startswith('hide_output') for d in ds): c.outputs = []
            if not c.source: continue
        out.append((c, ds))
    return out

def shown(nb_path):
    "The notebook with `#| hide` / `#| default_exp` cells removed and `#|` directive lines stripped."
    nb = read_nb(nb_path)
    nb.cells = [c for c, _ in shown_cells(nb_path)]
    for i, c in enumerate(nb.cells): c['id'] = f'c{i}'   # nbformat invents random ids for id-less (cleaned) cells
    return nb

def default_exp(nb_path):
    "The module a notebook exports to (`#| default_exp`), or None."
    for c in read_nb(nb_path).cells:
        for d in directives(c.source):
            if d.split()[:1] == ['default_exp']: return d.split()[1]
    return None

def lesson_notebooks(nbs='nbs'):
    return sorted(p for p in Path(nbs).glob('*.ipynb') if not p.name.startswith('_'))
