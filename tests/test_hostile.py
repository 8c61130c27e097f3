"""Hostile and careless input (issue 26): outputs checked before they are written, one exit-status table for every
command, data confined to its root, shared tables a spreadsheet cannot execute, refusals before anything is written.
Each family of the issue has at least one case here, so that it stays fixed."""
import json, os, re, shutil, stat, subprocess, sys
from pathlib import Path

import numpy as np, pandas as pd, pytest, torch
from safetensors.torch import load_file, save_file

from cxr_diffusion_nbs.core import project_root, sample_data_root, EXIT_CODES
from cxr_diffusion_nbs.checkpoints import CheckpointError, safe_load, load_denoiser
from cxr_diffusion_nbs.sampling import load_generator
from cli_in_process import run_cli

MODELS = project_root()/'data'/'models'


def _copy(name, tmp_path) -> Path:
    dst = tmp_path/name
    shutil.copytree(MODELS/name, dst)
    return dst


def _rewrite(f, fn):
    "Rewrite safetensors file `f` with `fn(tensor)` applied to every tensor."
    save_file({k: fn(v).contiguous() for k, v in load_file(str(f)).items()}, str(f))


# ---- 1. garbage out with exit 0 --------------------------------------------------------------------------------

@pytest.mark.parametrize('damage, message', [(lambda t: t.float() * 1e30, 'beyond 1e+06'), (lambda t: t.to(torch.int64), 'has type int64'),
                                             (lambda t: t > 0, 'has type bool')])
def test_damaged_weights_draw_nothing(tmp_path, damage, message):
    "Weights scaled up, or saved as integers or booleans, load without complaint into a float network: refused by name."
    model = _copy('cpu64_demo', tmp_path)
    _rewrite(model/'ema.safetensors', damage)
    r = run_cli('cxr-sample', '--checkpoint', model, '--n', '1', '--steps', '2', '--output', tmp_path/'out')
    assert r.returncode == 2 and 'ema.safetensors' in r.stderr and message in r.stderr, r.stderr
    assert r.stderr.strip().count('\n') == 0 and not (tmp_path/'out').exists()


def test_a_diverged_runs_finite_but_huge_weights_are_not_written(tmp_path):
    "lr 1e30 leaves finite weights of ~3e29 before the loss turns NaN: the saver refuses them (the last healthy state stays)."
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from cxr_diffusion_nbs.checkpoints import save_checkpoint
    from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, ConditioningConfig
    from cxr_diffusion_nbs.unet import unet_preset
    m = ConditionalDenoiser(unet_preset('tiny'), ConditioningConfig())
    with torch.no_grad(): next(m.parameters()).mul_(3e29)
    opt = torch.optim.AdamW(m.parameters())
    with pytest.raises(CheckpointError, match='beyond 1e\\+06.*not written'):
        save_checkpoint(tmp_path, 5, accelerator=Accelerator(cpu=True), model=m, optimizer=opt,
                        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), ema=EMAModel(m.parameters()),
                        gen=torch.Generator(), config_yaml='', signature={}, state=dict(step=5, epoch=0))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('field, value', [('scaling_factor', 'Infinity'), ('shift_factor', 'NaN'), ('scaling_factor', '-1.0')])
def test_autoencoder_latent_statistics_must_be_finite(tmp_path, field, value):
    from cxr_diffusion_nbs.vae import load_autoencoder
    model = _copy('cpu256_latent_demo', tmp_path)
    cf = model/'vae'/'config.json'
    cfg = json.loads(cf.read_text()); cfg[field] = 0.5
    cf.write_text(json.dumps(cfg).replace(f'"{field}": 0.5', f'"{field}": {value}'))
    with pytest.raises(CheckpointError, match=f"config.json: field '{field}': .*must be a finite number"):
        load_autoencoder(model/'vae')


def test_a_judge_with_nan_weights_is_refused(tmp_path):
    from cxr_diffusion_nbs.classifier import load_classifier
    judge = _copy('classifier64', tmp_path)
    f = judge/'classifier.safetensors'
    sd = load_file(str(f)); k = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
    sd[k] = sd[k].clone(); sd[k].view(-1)[0] = float('nan'); save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=f"classifier.safetensors: field '{k}': holds NaN.*scores NaN"):
        load_classifier(judge)


def test_every_generator_checks_its_images(monkeypatch):
    "A generator whose network draws flat films (weights that pass every check but are wrong) stops with an error."
    from cxr_diffusion_nbs.sampling import SamplingError
    gan = load_generator(MODELS/'gan64', device='cpu')
    monkeypatch.setattr(gan.net, 'forward', lambda z, y: torch.zeros(len(z), 1, 64, 64))
    with pytest.raises(SamplingError, match="gan64: field 'images': the drawn images are not films .*2 of 2 flat"):
        gan.generate(findings='nodule', n=2)


# ---- 2. one line and a documented exit status, not a traceback -------------------------------------------------

def test_exit_codes_are_documented_in_the_readme():
    readme = (project_root()/'README.md').read_text()
    for code in EXIT_CODES: assert f'| {code} |' in readme, code


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_a_device_the_machine_lacks_is_a_resource_error(tmp_path):
    r = run_cli('cxr-sample', '--device', 'cuda', '--n', '1', '--output', tmp_path/'out')
    assert r.returncode == 3 and "'cuda' is not available on this machine" in r.stderr and 'Traceback' not in r.stderr, r.stderr


@pytest.mark.parametrize('damage, message', [
    (lambda f: f.write_text(f.read_text()[:40]), "restorer.json: field '<json>': not valid JSON"),
    (lambda f: f.write_text('[1, 2]'), "restorer.json: field '<top level>': must be a JSON object"),
    (lambda f: f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != 'unet'})), "field 'unet': missing"),
    (lambda f: (f.parent/'scheduler'/'scheduler_config.json').write_text(json.dumps(dict(
        json.loads((f.parent/'scheduler'/'scheduler_config.json').read_text()), beta_schedule='bogus'))), "field 'beta_schedule': 'bogus'"),
    (lambda f: (f.parent/'scheduler'/'scheduler_config.json').write_text(json.dumps(dict(
        json.loads((f.parent/'scheduler'/'scheduler_config.json').read_text()), num_train_timesteps=-5))), "field 'num_train_timesteps': -5")])
def test_a_damaged_restorer_is_one_line(tmp_path, damage, message):
    model = _copy('restorer128_diffusion', tmp_path)
    damage(model/'restorer.json')
    (tmp_path/'in').mkdir(); shutil.copy(sample_data_root()/'images'/sorted(os.listdir(sample_data_root()/'images'))[0], tmp_path/'in')
    r = run_cli('cxr-restore', '--checkpoint', model, '--input', tmp_path/'in', '--output', tmp_path/'out', '--steps', '2')
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "A finished two-step run of configs/tiny.yaml on the bundled sample."
    out = tmp_path_factory.mktemp('run')/'tiny'
    r = run_cli('cxr-train', '--config', 'configs/tiny.yaml', '--set', f'output.output_dir={out}', 'optim.max_steps=2',
             'output.checkpoint_every=2', f'data.root={sample_data_root()}', 'output.progress=false')
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize('damage', [
    lambda ck: torch.save({'rng': {'python': 'x'}}, ck/'random_states_0.pt'),
    lambda ck: (ck/'train_state.json').write_text((ck/'train_state.json').read_text()[:10]),
    lambda ck: ((ck/'optimizer.pt').unlink(), (ck/'optimizer.pt').mkdir()),
    lambda ck: torch.save({'state': {}, 'param_groups': [{'params': [0]}, {'params': [1]}]}, ck/'optimizer.pt'),
    lambda ck: (ck/'optimizer.pt').write_bytes(os.urandom(300))])
def test_resume_from_a_damaged_state_is_refused_with_status_2(tiny_run, tmp_path, damage):
    run = tmp_path/'tiny'; shutil.copytree(tiny_run, run)
    damage(run/'checkpoint-2')
    r = run_cli('cxr-train', '--config', 'configs/tiny.yaml', '--set', f'output.output_dir={run}', 'optim.max_steps=3',
             f'data.root={sample_data_root()}', 'output.progress=false', '--resume', 'auto')
    assert r.returncode == 2 and 'checkpoint-2' in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_random_bytes_are_not_called_code(tmp_path):
    rng, f = np.random.default_rng(0), tmp_path/'x.pt'
    for _ in range(500):                          # random bytes break the unpickler in many ways: each is one refusal
        f.write_bytes(rng.bytes(200))
        with pytest.raises(CheckpointError, match='not a torch file|unreadable') as e: safe_load(f)
        assert 'run code' not in str(e.value)


def test_deep_json_and_python_yaml_tags_are_refused(tmp_path):
    from cxr_diffusion_nbs.training import load_for_sampling
    model = _copy('cpu64_demo', tmp_path)
    (model/'generator.json').write_text('[' * 100_000)
    with pytest.raises(CheckpointError, match='generator.json.*nested too deeply'): load_generator(model)
    (model/'generator.json').write_text(json.dumps({'kind': 'pixel-diffusion'}))
    (model/'config.yaml').write_text('model: !!python/object/apply:os.system ["true"]\n')
    with pytest.raises(Exception, match="config.yaml: field '<yaml>': not valid YAML"): load_for_sampling(model)


def test_a_garbage_latent_cache_is_one_error(tmp_path):
    from cxr_diffusion_nbs.latents import load_latent_cache
    from cxr_diffusion_nbs.core import CXRDataError
    (tmp_path/'latents.json').write_text('{}'); (tmp_path/'latents.safetensors').write_bytes(os.urandom(100))
    with pytest.raises(CXRDataError, match="field 'latents': the latent cache is unreadable"): load_latent_cache(None, tmp_path)


def test_rarity_predictions_holding_objects_are_refused(tmp_path):
    from cxr_diffusion_nbs.rarity import load_predictions, RarityError
    (tmp_path/'predictions').mkdir()
    np.save(tmp_path/'predictions'/'k20_mixing_n100_seed0.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
    pd.DataFrame({'image_id': ['a']}).to_csv(tmp_path/'test.csv', index=False)
    with pytest.raises(RarityError, match="k20_mixing_n100_seed0.npy: field 'predictions': not a probability array"):
        load_predictions(tmp_path)


@pytest.mark.parametrize('setting, field', [('optim.seed=99999999999999999999999999', 'optim.seed'), ('optim.seed=-1', 'optim.seed'),
                                            ('data.image_size=100000', 'data.image_size')])
def test_out_of_range_config_numbers_are_refused_before_the_run_folder(tmp_path, setting, field):
    r = run_cli('cxr-train', '--config', 'configs/tiny.yaml', '--set', f'output.output_dir={tmp_path/"run"}', setting)
    assert r.returncode == 2 and f"field '{field}'" in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'run').exists()


def test_a_dicom_whose_header_lies_about_its_size(tmp_path):
    import pydicom
    from cxr_diffusion_nbs.image_io import write_dicom, read_image
    from cxr_diffusion_nbs.core import ImageReadError
    f = tmp_path/'a.dcm'
    write_dicom(f, (np.random.default_rng(0).random((64, 64)) * 4000).astype(np.uint16))
    ds = pydicom.dcmread(f); ds.Rows = ds.Columns = 32; ds.save_as(f)
    with pytest.raises(ImageReadError, match="field 'Rows': .*need 2048 bytes of PixelData, the file holds 8192"): read_image(f)


# ---- 3. data confined to its root; 5. refusals before anything is written --------------------------------------

def _root(tmp_path, edit) -> Path:
    "A data folder with the bundled sample's manifest rows edited by `edit(DataFrame)`, its images copied."
    src = sample_data_root()
    root = tmp_path/'root'
    shutil.copytree(src/'images', root/'images')
    if (src/'masks').exists(): shutil.copytree(src/'masks', root/'masks')
    m = pd.read_csv(src/'manifest.csv', dtype=str, keep_default_na=False)
    edit(m).to_csv(root/'manifest.csv', index=False)
    return root


@pytest.mark.parametrize('edit, message', [
    (lambda m: m.assign(path=['../../../../../../etc/passwd'] + list(m.path[1:])), "field 'path': '../../../../../../etc/passwd' leaves the data folder"),
    (lambda m: m.assign(split=['trian'] + list(m.split[1:])), "unknown split 'trian'"),
    (lambda m: pd.concat([m, m.head(1)]), "field 'image_id': 1 duplicated image id"),
    (lambda m: m.assign(path=['images/empty.png'] + list(m.path[1:])), 'image file is empty (0 bytes')])
def test_training_on_a_hostile_root_writes_nothing(tmp_path, edit, message):
    root = _root(tmp_path, edit)
    (root/'images'/'empty.png').write_bytes(b'')
    r = run_cli('cxr-train', '--config', 'configs/tiny.yaml', '--set', f'data.root={root}', f'output.output_dir={tmp_path/"run"}')
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'run').exists()


def test_pipeline_parameters_are_checked_before_anything_runs(tmp_path):
    r = run_cli('cxr-pipeline', '--output', tmp_path/'p', '-p', 'train_steps', '-5', '--no-progress')
    assert r.returncode == 2 and "field 'train_steps': -5 is outside" in r.stderr, r.stderr
    r = run_cli('cxr-pipeline', '--output', tmp_path/'p', '-p', 'embedding', 'tsne', '--no-progress')   # refused before training, not at the map
    assert r.returncode == 2 and "field 'embedding': 'tsne'" in r.stderr, r.stderr
    assert not (tmp_path/'p').exists()


def test_an_unbounded_cohort_is_refused_at_once(tmp_path):
    r = run_cli('cxr-cohort', '--checkpoint', MODELS/'gan64', '--counts', 'nodule=1000000000000', '--output', tmp_path/'c',
             '--set', f'data_root={sample_data_root()}', '--no-progress')
    assert r.returncode == 2 and 'above the limit of 100,000' in r.stderr, r.stderr
    assert not (tmp_path/'c').exists()



def test_a_balanced_cohort_above_the_limit_is_refused():
    "balance='max' on a data set with a very common finding asks for as many images as counts can: the same limit."
    from types import SimpleNamespace
    from cxr_diffusion_nbs.cohort import CohortConfig, CohortError, target_counts, MAX_COHORT_IMAGES
    pool = SimpleNamespace(findings=('nodule', 'mass'), counts=lambda: {'nodule': MAX_COHORT_IMAGES + 1, 'mass': 0})
    with pytest.raises(CohortError, match="field 'max_per_finding': 100,001 images is above the limit of 100,000"):
        target_counts(CohortConfig(balance='max'), pool)
    assert target_counts(CohortConfig(balance='max', max_per_finding=10), pool) == {'nodule': 0, 'mass': 10}


# ---- 4. shared tables a spreadsheet would execute; valid as a set ---------------------------------------------

@pytest.fixture(scope='module')
def hostile_cohort(tmp_path_factory):
    "A GAN cohort (quick) from a data folder whose donors' `view` is a spreadsheet formula."
    tmp = tmp_path_factory.mktemp('hostile')
    root = _root(tmp, lambda m: m.assign(view='=HYPERLINK("http://x")'))
    r = run_cli('cxr-cohort', '--checkpoint', MODELS/'gan64', '--counts', 'nodule=2,effusion=1', '--output', tmp/'cohort',
             '--dicom', '--set', f'data_root={root}', '--no-progress')
    assert r.returncode == 0, r.stderr
    return tmp/'cohort'


def test_shared_tables_neutralise_formulas(hostile_cohort):
    for name in ('images.csv', 'plan.csv'):
        text = (hostile_cohort/name).read_text()
        assert '=HYPERLINK' in text or name == 'plan.csv'
        for cell in pd.read_csv(hostile_cohort/name, dtype=str, keep_default_na=False).to_numpy().ravel():
            assert not cell.startswith(('=', '+', '@', '\t', '\r')), (name, cell)


def test_private_files_are_owner_only(hostile_cohort):
    for f in (hostile_cohort/'private').iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_each_synthetic_patient_has_its_own_study_and_series(hostile_cohort):
    import pydicom
    ds = [pydicom.dcmread(f) for f in sorted((hostile_cohort/'dicom').glob('*.dcm'))]
    assert len(ds) == 3
    for key in ('StudyInstanceUID', 'SeriesInstanceUID', 'PatientID'): assert len({str(d[key].value) for d in ds}) == 3, key
    if shutil.which('dcentvfy'):
        r = subprocess.run(['dcentvfy', *sorted(map(str, (hostile_cohort/'dicom').glob('*.dcm')))], capture_output=True, text=True)
        assert 'Error' not in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_restorer_never_writes_a_film_that_is_not_one(tmp_path, monkeypatch):
    from cxr_diffusion_nbs.restorer import load_restorer, restore_file
    from cxr_diffusion_nbs.sampling import SamplingError
    r = load_restorer(MODELS/'restorer128_regression', 'cpu')
    monkeypatch.setattr(r, 'restore', lambda x, **kw: torch.full_like(x, float('nan')))
    src = sample_data_root()/'images'/sorted(os.listdir(sample_data_root()/'images'))[0]
    with pytest.raises(SamplingError, match="field 'images': the drawn images are not films .*1 of 1 not finite"):
        restore_file(r, src, tmp_path/'out.png')
    assert not (tmp_path/'out.png').exists()


# ---- 6. numbers in range: seeds, image sizes (and the memory they imply), step counts ---------------------------

@pytest.mark.parametrize('seed', ['-1', str(2**64)])
def test_a_cohort_seed_outside_numpys_range_is_refused_before_anything_is_written(tmp_path, seed):
    r = run_cli('cxr-cohort', '--checkpoint', MODELS/'gan64', '--counts', 'nodule=1', '--seed', seed, '--output', tmp_path/'c',
             '--set', f'data_root={sample_data_root()}', '--no-progress')
    assert r.returncode == 2 and "field 'seed'" in r.stderr and '4294967295' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'c').exists()


@pytest.mark.parametrize('tool,seed', [('cxr-sample', str(2**64)), ('cxr-sample', '-1'), ('cxr-restore', str(2**64))])
def test_a_drawing_seed_outside_the_generators_range_is_one_line(tmp_path, tool, seed):
    (tmp_path/'in').mkdir(); shutil.copy(sample_data_root()/'images'/sorted(os.listdir(sample_data_root()/'images'))[0], tmp_path/'in')
    args = (['--checkpoint', MODELS/'cpu64_demo', '--n', '1'] if tool == 'cxr-sample'
            else ['--checkpoint', MODELS/'restorer128_diffusion', '--input', tmp_path/'in'])
    r = run_cli(tool, *args, '--steps', '2', '--seed', seed, '--output', tmp_path/'out')
    assert r.returncode == 2 and "field 'seed'" in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not list((tmp_path/'out').glob('*.png')) if (tmp_path/'out').exists() else True   # nothing drawn


def _huge_model_config(tmp_path) -> Path:
    model = _copy('cpu64_demo', tmp_path)
    f = model/'model_config.json'
    d = json.loads(f.read_text()); d['unet']['image_size'] = 2**20; f.write_text(json.dumps(d))
    return model


@pytest.mark.parametrize('tool, args, where', [
    ('cxr-train', lambda tmp: ['--config', 'configs/tiny.yaml', '--set', f'output.output_dir={tmp/"out"}', 'data.image_size=100000'],
     "configs/tiny.yaml: field 'data.image_size': 100000 px"),
    ('cxr-sample', lambda tmp: ['--checkpoint', _huge_model_config(tmp), '--n', '1', '--output', tmp/'out'],
     "model_config.json: field 'unet.image_size': 1048576 px"),
    ('cxr-cohort', lambda tmp: ['--checkpoint', _huge_model_config(tmp), '--counts', 'nodule=1', '--output', tmp/'out', '--no-progress'],
     "model_config.json: field 'unet.image_size': 1048576 px")])
def test_an_image_size_above_the_limit_is_refused_with_the_memory_it_implies(tmp_path, tool, args, where):
    "A config or a model folder asking for films of 1e5 or 1e6 px a side: one line naming the file and field, the limit and the memory."
    r = run_cli(tool, *args(tmp_path))
    assert r.returncode == 2 and where in r.stderr and 'above the limit of 4096 px' in r.stderr and 'GiB' in r.stderr, r.stderr
    assert r.stderr.strip().count('\n') == 0 and not (tmp_path/'out').exists()


@pytest.mark.parametrize('tool, args, field', [
    ('cxr-sample', lambda tmp: ['--checkpoint', MODELS/'cpu64_demo', '--n', '1', '--steps', '0', '--output', tmp/'out'], 'steps'),
    ('cxr-cohort', lambda tmp: ['--checkpoint', MODELS/'cpu64_demo', '--counts', 'nodule=1', '--steps', '-3', '--output', tmp/'out',
                                '--set', f'data_root={sample_data_root()}', '--no-progress'], 'steps'),
    ('cxr-restore', lambda tmp: ['--checkpoint', MODELS/'restorer128_diffusion', '--input', sample_data_root()/'images', '--steps', '0',
                                 '--output', tmp/'out'], 'steps'),
    ('cxr-train', lambda tmp: ['--config', 'configs/tiny.yaml', '--set', f'output.output_dir={tmp/"out"}', 'output.sample_steps=0'],
     'output.sample_steps'),
    ('cxr-pipeline', lambda tmp: ['--output', tmp/'out', '-p', 'sample_steps', '0', '--no-progress'], 'sample_steps')])
def test_a_step_count_below_one_is_refused_before_anything_is_written(tmp_path, tool, args, field):
    "Sampling steps are timesteps: at least one, for every command that draws (the pipeline once trained 4 minutes first)."
    r = run_cli(tool, *args(tmp_path))
    assert r.returncode == 2 and f"field '{field}'" in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'out').exists()


# ---- 7. a cohort says what it will cost before the bulk of it ----------------------------------------------------

ESTIMATE = re.compile(r'cohort: (?P<n>[\d,]+) (?:of [\d,]+ )?images (?:left )?from a (?P<what>.+?) \((?P<how>.+)\): about (?P<t>[\d.]+) '
                      r'(?P<unit>s|min|h|days) on (?P<device>\w+) \((?P<per>[\d.e+-]+) s/image measured on a first batch of '
                      r'(?P<first>\d+)\), peak memory about (?P<mem>[\d.]+) (?P<munit>MB|GB)')


@pytest.mark.parametrize('flags', [[], ['--no-progress']])
def test_a_cohort_prints_its_estimate_line(tmp_path, flags):
    "One line on stderr, with or without the bars: the images, the generator and how it draws, the time at the first batch's measured rate, the peak memory."
    r = run_cli('cxr-cohort', '--checkpoint', MODELS/'gan64', '--counts', 'nodule=4,effusion=1', '--batch-size', '2',
             '--output', tmp_path/'c', '--set', f'data_root={sample_data_root()}', *flags)
    assert r.returncode == 0, r.stderr
    lines = [l.strip() for l in re.split('[\r\n]', r.stderr) if l.strip().startswith('cohort: ')]
    assert len(lines) == 1, r.stderr
    m = ESTIMATE.fullmatch(lines[0])
    assert m, lines[0]
    assert (m['n'], m['what'], m['device'], m['first']) == ('5', 'GAN', 'cpu', '2') and m['how'] == 'drawn in one pass, no sampler, truncation none'
    per, t = float(m['per']), float(m['t']) * {'s': 1, 'min': 60, 'h': 3600, 'days': 86400}[m['unit']]
    assert 0 < per < 60 and t == pytest.approx(5 * per, rel=0.2, abs=0.06)          # the whole request at the measured rate
    assert 50e6 < float(m['mem']) * {'MB': 1e6, 'GB': 1e9}[m['munit']] < 256e9     # this process: torch and a 64-px GAN


def test_the_estimate_comes_after_the_first_batch_whose_images_are_kept(tmp_path):
    "The measured batch is the request's own first batch, written and kept; the rest of the images and the manifest follow the line."
    from cxr_diffusion_nbs.cohort import build_cohort
    out, seen = tmp_path/'c', []
    log = lambda line: seen.append((line, sorted(p.name for p in (out/'images').glob('*.png')), (out/'manifest.json').exists()))
    cfg = dict(checkpoint=str(MODELS/'gan64'), output_dir=str(out), data_root=str(sample_data_root()), counts={'nodule': 5}, batch_size=2)
    build_cohort(cfg, progress=False, log=log)
    assert len(seen) == 1 and seen[0][1:] == (['syn_000000.png', 'syn_000001.png'], False), seen
    assert ESTIMATE.fullmatch(seen[0][0])['n'] == '5' and len(list((out/'images').glob('*.png'))) == 5
    lines = (out/'records.jsonl').read_text().splitlines()                          # a kill after 3 images: 2 left
    (out/'records.jsonl').write_text('\n'.join(lines[:3]) + '\n')
    seen.clear(); build_cohort(cfg, progress=False, log=log)
    assert seen[0][0].startswith('cohort: 2 of 5 images left from a GAN') and 'first batch of 2)' in seen[0][0], seen
    build_cohort(cfg, progress=False, log=log)                                      # nothing left: nothing to estimate
    assert len(seen) == 1


def test_the_estimate_is_the_measured_rate_times_the_images():
    from cxr_diffusion_nbs.cohort import cohort_estimate, format_duration, format_bytes
    est = cohort_estimate(100_000, 8, 2.0, 'a GAN (drawn in one pass)', 1.5e9, 'cpu')
    assert est['seconds'] == pytest.approx(25_000) and est['per_image'] == pytest.approx(0.25)
    assert est['line'] == ('cohort: 100,000 images from a GAN (drawn in one pass): about 6.9 h on cpu '
                           '(0.25 s/image measured on a first batch of 8), peak memory about 1.5 GB')
    assert [format_duration(s) for s in (3, 75, 600, 7200, 3e5)] == ['3.0 s', '75 s', '10 min', '2.0 h', '3.5 days']
    assert format_bytes(3.2e8) == '320 MB' and 'peak memory' not in cohort_estimate(1, 1, 0.1)['line']   # unknown (Windows): not claimed
