"""Every notebook runs top to bottom (cells flagged `#| slow` skipped), as `nbdev-test` would run it."""
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook

NBS = sorted(p for p in (Path(__file__).parents[1]/'nbs').glob('*.ipynb') if not p.name.startswith('_'))

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook_runs(nb):
    ok, secs = run_notebook(nb, skip_flags=['slow'], cell_timeout=600)
    assert ok, f"{nb.name} failed (traceback above, on stderr)"
