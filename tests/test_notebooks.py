"""Every notebook runs top to bottom (cells flagged `#| slow` skipped), as `nbdev-test` would run it.

CI runs this file twice: with the shared subset beside the clone, then as a new user sees the project
(`CXR_NO_SHARED=1`, the bundled sample only). The first pass notes, per notebook, whether anything it ran chose the
shared folder (`core.find_data_root` / `dicom_data_root` append to the file `CXR_SHARED_LOG` names; the CLIs a
notebook starts inherit it), keyed by the notebook's and the library's text. The second pass skips a notebook whose
first pass, on the same text, never chose it: without `../shared` it would run the very same cells on the very same
data. A notebook with no note from a first pass (a changed notebook, a second pass run alone) always runs."""
import hashlib, os
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook
from cxr_diffusion_nbs.core import _shared_hidden

ROOT = Path(__file__).parents[1]
# 21_pipeline is the main job (10-15 CPU minutes with its defaults; front matter `skip_exec: true`, which nbdev-test
# honours too): tests/test_pipeline.py runs it end to end with papermill and small parameters instead.
NBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_') and p.name != '21_pipeline.ipynb')


def text_key(nb: Path) -> str:
    "A digest of the notebook and of every library module: a note about shared-data use holds for this text only."
    h = hashlib.sha256(nb.read_bytes())
    for f in sorted((ROOT/'cxr_diffusion_nbs').glob('*.py')): h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook_runs(nb, request, monkeypatch, tmp_path):
    cache, key = request.config.cache, f'cxr_diffusion_nbs/reads_shared/{nb.stem}'
    note = cache.get(key, None)
    if _shared_hidden() and note and note['text'] == text_key(nb) and not note['reads_shared']:
        pytest.skip(f'{nb.name} chose no shared data in the pass with it (same text): it ran these cells on the bundled sample already')
    log = tmp_path/'shared.log'
    monkeypatch.setenv('CXR_SHARED_LOG', str(log))
    ok, secs = run_notebook(nb, skip_flags=['slow'], cell_timeout=600)
    assert ok, f"{nb.name} failed (traceback above, on stderr)"
    if not _shared_hidden() and 'CXR_DATA_ROOT' not in os.environ:
        cache.set(key, {'text': text_key(nb), 'reads_shared': log.exists()})
