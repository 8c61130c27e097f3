"""Write `nbs/index.ipynb` (the docs home page) from README.md, or check that they agree (`--check`).

`nbdev-readme` would go the other way but needs Quarto; this keeps the two identical without it.
"""
import sys
from pathlib import Path
import nbformat
from nbformat.v4 import new_notebook, new_markdown_cell

ROOT = Path(__file__).resolve().parents[1]

def readme_sections(text: str) -> list:
    "README split into markdown cells at each `## ` heading."
    cells, cur = [], []
    for line in text.rstrip('\n').split('\n'):
        if line.startswith('## ') and cur: cells.append('\n'.join(cur).strip('\n')); cur = []
        cur.append(line)
    cells.append('\n'.join(cur).strip('\n'))
    return cells

def for_index(readme: str) -> str:
    "README text as nbs/index.ipynb shows it: links into nbs/ made relative to nbs/ (figures are `nbs/images/...` in the README)."
    return readme.replace('](nbs/', '](')

def index_text(nb) -> str: return '\n\n'.join(c.source for c in nb.cells if c.cell_type == 'markdown')

def main(check=False):
    readme = for_index((ROOT/'README.md').read_text())
    target = ROOT/'nbs'/'index.ipynb'
    if check:
        nb = nbformat.read(target, as_version=4)
        want = '\n\n'.join(readme_sections(readme))
        if index_text(nb) != want: sys.exit('nbs/index.ipynb differs from README.md: run python tools/sync_index.py')
        return print('README.md and nbs/index.ipynb agree')
    nb = new_notebook(cells=[new_markdown_cell(s) for s in readme_sections(readme)])
    old = nbformat.read(target, as_version=4).cells if target.exists() else []
    for c, o in zip(nb.cells, old): c['id'] = o.get('id', c['id'])     # keep cell ids: a README edit diffs as an edit
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    nbformat.write(nb, target)
    print(f'wrote {target}')

if __name__ == '__main__': main('--check' in sys.argv)
