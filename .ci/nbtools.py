"Shared by readme.py and docs.py: read a notebook the way nbdev shows it (hidden cells dropped, directives stripped)."
import re, warnings
from pathlib import Path
import nbformat

DIRECTIVE = re.compile(r'^\s*#\|\s*(.*)$')

def directives(src):
    return [m.group(1).strip() for line in src.splitlines() if (m := DIRECTIVE.match(line))]

def shown(nb_path):
    "The notebook with `#| hide` / `#| default_exp` cells removed and `#|` directive lines stripped."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # nbdev_clean strips cell ids on purpose
        nb = nbformat.read(nb_path, as_version=4)
    cells = []
    for c in nb.cells:
        ds = directives(c.source)
        if any(d.split()[0] in ('hide', 'default_exp') for d in ds if d): continue
        if c.cell_type == 'code':
            c.source = '\n'.join(l for l in c.source.splitlines() if not DIRECTIVE.match(l)).strip('\n')
            if any(d.startswith('hide_output') for d in ds): c.outputs = []
            if not c.source: continue
        cells.append(c)
    for i, c in enumerate(cells): c['id'] = f'c{i}'   # nbformat invents random ids for id-less (cleaned) cells
    nb.cells = cells
    return nb

def lesson_notebooks(nbs='nbs'):
    return sorted(p for p in Path(nbs).glob('*.ipynb') if not p.name.startswith('_'))
