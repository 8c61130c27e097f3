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

def readme_command(prog: str) -> list:
    "The README's `.venv/bin/<prog> ...` command line, split into arguments."
    import shlex
    line = next(l for l in (ROOT/'README.md').read_text().splitlines() if l.startswith(f'.venv/bin/{prog} '))
    return shlex.split(line)[1:]

def test_readme_sample_command_runs(tmp_path):
    "The README's cxr-sample line, made small (2 images, 3 steps) and pointed at a scratch folder."
    args = readme_command('cxr-sample') + ['--n', '2', '--steps', '3', '--output', str(tmp_path/'s')]
    r = subprocess.run([str(Path(sys.executable).parent/'cxr-sample'), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path/'s').glob('sample_*.png'))) == 2

def test_readme_cohort_command_runs(tmp_path):
    "The README's cxr-cohort line (its config: the GAN), made small (1 image per finding) into a scratch folder."
    args = readme_command('cxr-cohort') + ['--set', 'max_per_finding=1', 'dicom=false', '--output', str(tmp_path/'c'), '--no-progress']
    r = subprocess.run([str(Path(sys.executable).parent/'cxr-cohort'), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    out = json.loads(r.stdout)
    assert out['images'] >= 3 and (tmp_path/'c'/'images.csv').exists()
    assert f"cohort: {out['images']} images from a GAN" in r.stderr and 'measured on a first batch' in r.stderr   # the estimate line
