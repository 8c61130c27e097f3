"""The README stays true: its install and test commands are the ones CI runs, and the docs home page says the same."""
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

def test_ci_runs_the_readme_commands():
    readme, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()
    cmds = [re.sub(r'\s+#.*$', '', l).replace(' -q ', ' ').strip() for l in ci.splitlines() if '# README:' in l]
    assert len(cmds) == 2, cmds
    for c in cmds: assert c in readme, f"README lacks the command CI runs: {c}"

def test_no_settings_ini_and_nbdev_config_in_pyproject():
    assert not (ROOT/'settings.ini').exists(), "nbdev 3 refuses settings.ini"
    import tomllib
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())
    assert cfg['tool']['nbdev']['lib_path'] == 'cxr_diffusion_nbs'
    assert 'tags' in cfg['tool']['nbdev']['allowed_cell_metadata_keys']

def test_index_matches_readme():
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'sync_index.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
