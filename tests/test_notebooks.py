"""Every notebook runs top to bottom (cells flagged `#| slow` skipped), as `nbdev-test` would run it."""
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook

# 21_pipeline is the main job (10-15 CPU minutes with its defaults; front matter `skip_exec: true`, which nbdev-test
# honours too): tests/test_pipeline.py runs it end to end with papermill and small parameters instead.
NBS = sorted(p for p in (Path(__file__).parents[1]/'nbs').glob('*.ipynb') if not p.name.startswith('_') and p.name != '21_pipeline.ipynb')

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook_runs(nb):
    ok, secs = run_notebook(nb, skip_flags=['slow'], cell_timeout=600)
    assert ok, f"{nb.name} failed (traceback above, on stderr)"
