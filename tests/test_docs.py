"""What can be checked of the docs without Quarto: `nbdev-proc-nbs` succeeds, every notebook converts to standalone
HTML with its stored static figures, and a static figure always comes before the first widget."""
import json, re, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]
NBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
LESSONS = [p for p in NBS if p.name != 'index.ipynb']
BIN = Path(sys.executable).parent

def makes_figures(nb) -> bool:
    "True if the notebook draws with matplotlib (then its figures must be stored for the docs)."
    cells = json.loads(nb.read_text())['cells']
    return any(c['cell_type'] == 'code' and ('plt.' in ''.join(c['source']) or 'plt.subplots' in ''.join(c['source'])) for c in cells)

CELL_KEYS = {'markdown': {'cell_type', 'id', 'metadata', 'source', 'attachments'},
             'code': {'cell_type', 'id', 'metadata', 'source', 'outputs', 'execution_count'},
             'raw': {'cell_type', 'id', 'metadata', 'source', 'attachments'}}

def standalone_copy(src: Path, dst_dir: Path) -> Path:
    "The processed notebook without nbdev's private cell keys and timing metadata (Quarto ignores them; nbformat does not)."
    nb = json.loads(src.read_text())
    for c in nb['cells']:
        for k in set(c) - CELL_KEYS[c['cell_type']]: del c[k]
        c.get('metadata', {}).pop('execution', None)
    out = dst_dir/'in'/src.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(nb))
    return out

@pytest.fixture(scope='module')
def proc_dir(tmp_path_factory):
    "Run nbdev-proc-nbs on a scratch copy of the project (it writes `_proc/`)."
    dst = tmp_path_factory.mktemp('docs')/'proj'
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns('.venv', '.git', '_proc', '_docs', '__pycache__', 'data', 'runs'))
    (dst/'data').symlink_to(ROOT/'data')
    r = subprocess.run([str(BIN/'nbdev-proc-nbs')], cwd=dst, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return dst/'_proc'

def test_quarto_config_is_complete(proc_dir):
    import yaml
    q = yaml.safe_load((ROOT/'nbs'/'_quarto.yml').read_text())
    assert q['project']['type'] == 'website' and 'nbdev.yml' in q['metadata-files']
    assert (proc_dir/'_quarto.yml').exists() and (proc_dir/'nbdev.yml').exists() and (proc_dir/'sidebar.yml').exists()
    side = (proc_dir/'sidebar.yml').read_text()
    for nb in LESSONS: assert nb.name in side, f"{nb.name} missing from the docs sidebar"

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_converts_to_html_with_figures(proc_dir, nb, tmp_path):
    src = proc_dir/nb.name
    assert src.exists(), f"nbdev-proc-nbs did not process {nb.name}"
    from nbconvert import HTMLExporter                # what `jupyter nbconvert --to html` runs, without a new interpreter each time
    html, _ = HTMLExporter().from_filename(str(standalone_copy(src, tmp_path)))
    assert '<html' in html
    if makes_figures(nb): assert re.search('data:image/(png|jpeg);base64', html), f"{nb.name}: no stored figure in the HTML (run it with nbdev-test --save)"

@pytest.mark.parametrize('nb', LESSONS, ids=[p.stem for p in LESSONS])
def test_static_figure_before_widget(nb):
    cells = json.loads(nb.read_text())['cells']
    seen_png = False
    for c in cells:
        for o in c.get('outputs', []):
            data = o.get('data', {})
            if 'image/png' in data or 'image/jpeg' in data: seen_png = True
            if 'application/vnd.jupyter.widget-view+json' in data:
                assert seen_png, f"{nb.name}: a widget comes before any static figure"

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_outputs_stay_small(nb):
    assert nb.stat().st_size < 1_500_000, f"{nb.name} is {nb.stat().st_size/1e6:.1f} MB: shrink its figures (tools/shrink_outputs.py)"

def test_notebooks_stay_small_in_all():
    total = sum(nb.stat().st_size for nb in NBS)
    assert total < 6_000_000, f"the notebooks take {total/1e6:.1f} MB: shrink their figures (tools/shrink_outputs.py) or clear bulky outputs"

MACHINE_PATH = re.compile(r'(?<![\w.])/(?:tmp|var/folders|private/var|home|Users|root)/[^\s\'"]+')

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_stored_outputs_show_no_machine_path(nb):
    "The stored outputs are what every docs reader sees: no temporary folder, home folder or this clone's location."
    here = str(ROOT.resolve())
    for i, c in enumerate(json.loads(nb.read_text())['cells']):
        for o in c.get('outputs', []):
            text = json.dumps({k: v for k, v in o.get('data', {}).items() if not k.startswith('image/')}) + json.dumps(o.get('text', ''))
            found = MACHINE_PATH.findall(text) + ([here] if here in text else [])
            assert not found, f"{nb.name} cell {i}: its stored output shows {found[0]!r} (print shareable_path(...) instead)"

EXPORTED = re.compile(r'^#\|\s*(export|exports|exporti|exec_doc)\b', re.M)

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_docs_build_runs_no_lesson_code(nb):
    """nbdev's docs build (`exec_show_docs`) executes every cell holding an import anywhere in it, the whole cell: an
    import beside a lesson's drawing or training makes the docs build (and this suite's `nbdev-proc-nbs`) run that
    computation. Imports get a cell of their own."""
    import ast
    for i, c in enumerate(json.loads(nb.read_text())['cells']):
        src = ''.join(c['source'])
        if c['cell_type'] != 'code' or EXPORTED.search(src) or re.search(r'^#\|\s*eval:\s*false', src, re.M): continue
        tree = ast.parse(src)
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)):
            others = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not others, f"{nb.name} cell {i}: imports beside other code (line {others[0].lineno}); put the imports in a cell of their own"

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_exported_cells_stay_lesson_sized(nb):
    "An exported cell over 60 lines is source pasted into a notebook, not a lesson: grow it in steps, or split it."
    for i, c in enumerate(json.loads(nb.read_text())['cells']):
        src = ''.join(c['source'])
        if c['cell_type'] == 'code' and EXPORTED.search(src):
            assert len(src.splitlines()) <= 60, f"{nb.name} cell {i}: an exported cell of {len(src.splitlines())} lines (at most 60)"
