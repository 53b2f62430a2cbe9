"""Generate README.md from nbs/index.ipynb without quarto (nbdev_readme needs quarto, which is not installable here).

Usage: python .ci/readme.py [--check]   (--check: exit 1 if README.md is not current)"""
import sys
from pathlib import Path
from nbconvert import MarkdownExporter
sys.path.insert(0, str(Path(__file__).parent))
from nbtools import shown

def render():
    body, _ = MarkdownExporter().from_notebook_node(shown('nbs/index.ipynb'))
    note = '<!-- Generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file. -->\n\n'
    return note + body.strip() + '\n'

if __name__ == '__main__':
    text, readme = render(), Path('README.md')
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is out of date: run `python .ci/readme.py` and commit it')
    else:
        readme.write_text(text)
