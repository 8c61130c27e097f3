"""Tests of the learned restorers (cxr_diffusion_nbs.restorer): training degradations, the SR3 denoiser in the package's
one sampling loop, config errors by field, a run killed and resumed equal to an uninterrupted one, the restorer folder
(diffusers `from_pretrained`), refused weights, `cxr-restore` on PNG and DICOM files, and the shipped restorers."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from cxr_diffusion_nbs.core import ConfigError, sample_data_root
from cxr_diffusion_nbs.image_io import read_image, write_dicom
from cxr_diffusion_nbs.restoration import LEVELS, Degradation, degrade, level_spec, to_signed
from cxr_diffusion_nbs.restorer import (RESTORER_FILE, PROCESSED_NOTE, RestorerError, build_restorer, degrade_crops,
                                        load_restorer, load_restorer_config, main, random_degradation, train_restorer)
from cxr_diffusion_nbs.unet import unet_preset
from cli_in_process import run_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHIPPED = {k: ROOT/'data'/'models'/f'restorer128_{k}' for k in ('diffusion', 'residual', 'regression')}


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(out, objective='diffusion', **optim):
    "A tiny run on 8 bundled training films: 32-px crops of 64-px films, batch 2, float32."
    return {'model': {'preset': 'tiny', 'objective': objective, 'steps': 3},
            'data': {'root': str(sample_data_root()), 'image_size': 64, 'crop_size': 32, 'limit': 8},
            'optim': {'batch_size': 2, 'max_steps': 4, 'warmup_steps': 1, 'mixed_precision': 'no', 'cpu': True, **optim},
            'output': {'output_dir': str(out), 'checkpoint_every': 2, 'log_every': 2, 'progress': False}}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A tiny diffusion restorer and a tiny regressor, trained for 4 steps."
    d = tmp_path_factory.mktemp('restorers')
    for k in ('diffusion', 'regression'): train_restorer(tiny(d/k, k))
    return d


def test_training_degradations_cover_the_levels_and_repeat_per_seed():
    rng = np.random.default_rng(1)
    specs = [random_degradation(rng, ('noise', 'downsample'), combine=1.0) for _ in range(200)]
    assert all(s.downsample == 2 for s in specs if s.dose)                      # combine=1: every noisy film is binned too
    assert {s.downsample for s in specs if not s.dose} == {2, 4}
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.equal(degrade_crops(x, 7, 3), degrade_crops(x, 7, 3))
    assert not torch.equal(degrade_crops(x, 7, 3), degrade_crops(x, 8, 3))


@pytest.mark.parametrize('override, field', [
    ('model.objective=gan', 'model.objective'), ('model.preset=huge', 'model.preset'),
    ('degradation.kinds=[contrast]', 'degradation.kinds'), ('degradation.combine=2', 'degradation.combine'),
    ('data.crop_size=30', 'data.crop_size'), ('data.crop_size=256', 'data.crop_size'), ('model.ema_decay=1', 'model.ema_decay'),
    ('model.sampler=euler', 'model.sampler'), ('optim.lr=inf', 'optim.lr'), ('output.keep_last=0', 'output.keep_last'),
    ('model.residual_scale=0.1', 'model.residual_scale'),                          # clip_sample would cut the residual
    ('model.residual_scale=0', 'model.residual_scale'), ('model.residual_scale=.nan', 'model.residual_scale')])
def test_bad_configs_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
        load_restorer_config(ROOT/'configs'/'restorer128_diffusion.yaml', [override])
    with pytest.raises(ConfigError, match=r'model\.residual_scale.*only a diffusion'):
        load_restorer_config(ROOT/'configs'/'restorer128_regression.yaml', ['model.residual_scale=0.1', 'model.overrides={clip_sample: false}'])


def test_both_configs_load():
    for k in ('diffusion', 'regression', 'residual'):
        cfg = load_restorer_config(ROOT/'configs'/f'restorer128_{k}.yaml')
        assert cfg.model.objective == ('regression' if k == 'regression' else 'diffusion') and cfg.data.crop_size == 64 and cfg.data.image_size == 128
    assert cfg.model.residual_scale == 0.1 and cfg.unet_config().clip_sample is False


def test_residual_restorer_draws_around_the_degraded_film(tmp_path):
    "Residual diffusion: the network draws (clean - degraded) / s, so even an untrained one stays within ~s of its input;"
    "the scale is saved with it, a loaded one uses it, and a run cannot resume with another scale."
    cfg = tiny(tmp_path/'res'); cfg['model'].update(residual_scale=0.01, overrides={'clip_sample': False})
    train_restorer(cfg)
    r = load_restorer(tmp_path/'res', 'cpu')
    assert r.model.residual_scale == 0.01 and json.loads((tmp_path/'res'/'restorer'/RESTORER_FILE).read_text())['residual_scale'] == 0.01
    x = torch.rand(2, 1, 32, 32) * 1.6 - 0.8
    y = r.restore(x, seed=0, steps=2)
    assert 0 < (y - x).abs().max() < 0.2                                          # an image-drawing network would not be anchored
    cfg['model']['residual_scale'] = 0.02; cfg['output']['resume'] = 'auto'
    with pytest.raises(ConfigError, match='another network'): train_restorer(cfg)
    info = json.loads((tmp_path/'res'/'restorer'/RESTORER_FILE).read_text())
    (tmp_path/'res'/'restorer'/RESTORER_FILE).write_text(json.dumps(dict(info, residual_scale=-1)))
    with pytest.raises(RestorerError, match='residual_scale'): load_restorer(tmp_path/'res'/'restorer', 'cpu')


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    full = train_restorer(tiny(tmp_path/'full'))
    assert train_restorer(tiny(tmp_path/'killed'), stop_after=2)['stopped_at'] == 2
    (tmp_path/'killed'/'.log.csv.k1lled_x.csv').write_text('half')              # what a kill mid-write leaves
    again = train_restorer(tiny(tmp_path/'killed'), ['output.resume=auto'])
    assert again['start_step'] == 2 and again['steps'] == full['steps'] == 4
    a, b = load_restorer(tmp_path/'full', 'cpu'), load_restorer(tmp_path/'killed', 'cpu')
    for p, q in zip(a.model.parameters(), b.model.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert not (tmp_path/'killed'/'.log.csv.k1lled_x.csv').exists()
    rows = (tmp_path/'killed'/'log.csv').read_text().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['2', '4']                    # the log rewound, nothing repeated
    with pytest.raises(ConfigError, match='already holds checkpoints'): train_restorer(tiny(tmp_path/'full'))


def test_restorer_folder_opens_with_diffusers_and_restores_any_size(trained):
    f = trained/'diffusion'/'restorer'
    info = json.loads((f/RESTORER_FILE).read_text())
    assert info['objective'] == 'diffusion' and info['trained_steps'] == 4
    unet = UNet2DModel.from_pretrained(f/'unet', use_safetensors=True)
    assert unet.config.in_channels == 2                                          # the noisy film and the degraded one
    r = load_restorer(trained/'diffusion', 'cpu')
    x = torch.rand(3, 1, 37, 45) * 2 - 1
    y = r.restore(x, seed=5, steps=2)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert torch.equal(y, r.restore(x, seed=5, steps=2)) and not torch.equal(y, r.restore(x, seed=6, steps=2))
    torch.testing.assert_close(r.restore(x[1:2], seed=6, steps=2), y[1:2], rtol=0, atol=1e-4)   # image i is seeded seed + i, whatever the batch
    g = load_restorer(trained/'regression', 'cpu')
    assert g.restore(x).shape == x.shape and torch.equal(g.restore(x), g.restore(x))
    with pytest.raises(RestorerError, match='samples'): r.restore(x, samples=0)
    with pytest.raises(RestorerError, match='sampler'): r.restore(x, sampler='euler')
    with pytest.raises(RestorerError, match='degraded'): r.restore(torch.full((1, 1, 8, 8), float('nan')))


def test_corrupt_or_missing_weights_are_refused_by_name(trained, tmp_path):
    import shutil
    f = tmp_path/'r'; shutil.copytree(trained/'regression'/'restorer', f)
    w = f/'unet'/'diffusion_pytorch_model.safetensors'
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(RestorerError, match='diffusion_pytorch_model.safetensors'): load_restorer(f, 'cpu')
    w.unlink()
    with pytest.raises(RestorerError, match='missing'): load_restorer(f, 'cpu')
    with pytest.raises(RestorerError, match='holds no restorer.json'): load_restorer(tmp_path, 'cpu')


def _films(folder):
    "Two bundled films degraded by noise, one as PNG (not square), one as a 12-bit MONOCHROME1 DICOM."
    folder.mkdir()
    films = sorted((sample_data_root()/'images').glob('*.png'))[:2]
    a = degrade(np.asarray(Image.open(films[0]).convert('L').resize((72, 64)), dtype=np.float64) / 255, level_spec('noise', 'severe'), 0)
    Image.fromarray(np.round(a * 255).astype(np.uint8)).save(folder/'film_a.png')
    b = degrade(np.asarray(Image.open(films[1]).convert('L').resize((64, 64)), dtype=np.float64) / 255, level_spec('noise', 'moderate'), 1)
    write_dicom(folder/'film_b.dcm', np.round((1 - b) * 4095).astype(np.uint16), photometric='MONOCHROME1', bits_stored=12)
    (folder/'notes.txt').write_text('not a film')
    return folder


def test_cli_restores_png_and_dicom_at_their_size_marked_as_processed(trained, tmp_path):
    src = _films(tmp_path/'in')
    args = ['--checkpoint', str(trained/'diffusion'), '--input', str(src), '--steps', '2', '--device', 'cpu']
    r = subprocess.run([str(BIN/'cxr-restore'), *args, '--output', str(tmp_path/'out')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    outs = sorted((tmp_path/'out').iterdir())
    assert [p.name for p in outs] == ['film_a.png', 'film_b.png']
    a, b = Image.open(outs[0]), Image.open(outs[1])
    assert a.size == (72, 64) and b.size == (64, 64) and a.mode == 'L'
    assert a.text['Description'] == PROCESSED_NOTE and json.loads(a.text['Restorer'])['objective'] == 'diffusion'
    reg = run_cli('cxr-restore', '--checkpoint', trained/'regression', '--input', src, '--output', tmp_path/'reg')   # in process: the rest
    assert reg.returncode == 0, reg.stderr[-2000:]
    # the regressor starts as the identity: its output follows the input, so MONOCHROME1 was read the right way up
    assert np.corrcoef(read_image(tmp_path/'reg'/'film_b.png').ravel(), read_image(src/'film_b.dcm').ravel())[0, 1] > 0.9
    again = run_cli('cxr-restore', *args, '--output', tmp_path/'out')
    assert again.returncode == 0 and '0 film(s) restored' in again.stdout and '2 already there' in again.stdout
    assert not [p for p in (tmp_path/'out').rglob('.*')]


@pytest.mark.parametrize('case, expect', [('no-films', '--input'), ('output-is-file', '--output'), ('not-a-restorer', 'restorer.json'),
                                          ('bad-steps', 'steps')])
def test_cli_refuses_before_any_work(trained, tmp_path, case, expect):
    src = _films(tmp_path/'in')
    args = dict(checkpoint=str(trained/'diffusion'), input=str(src), output=str(tmp_path/'out'))
    extra = []
    if case == 'no-films': args['input'] = str(tmp_path); (tmp_path/'x.txt').write_text('')
    if case == 'output-is-file': (tmp_path/'f').write_text(''); args['output'] = str(tmp_path/'f')
    if case == 'not-a-restorer': args['checkpoint'] = str(tmp_path)
    if case == 'bad-steps': extra = ['--steps', '0']
    with pytest.raises(SystemExit) as e:
        main([f'--{k}={v}' for k, v in args.items()] + extra)
    assert e.value.code == 2
    assert not (tmp_path/'out').exists()


@pytest.mark.parametrize('kind', ['diffusion', 'residual', 'regression'])
def test_shipped_restorer_restores_noise_and_coarse_pixels(kind):
    "The shipped restorers beat the degraded input on bundled validation films: severe noise and 2x binning at 128 px."
    from cxr_diffusion_nbs.restoration import film_psnr, restoration_films
    r = load_restorer(SHIPPED[kind], 'cpu')
    assert r.info['kinds'] == ['noise', 'read_noise', 'downsample']
    films = restoration_films(n=4, size=128, root=sample_data_root())['clean']
    for level in (level_spec('noise', 'severe'), Degradation(dose=400, downsample=2)):
        d = np.stack([degrade(f, level, seed=i) for i, f in enumerate(films)])
        out = ((r.restore(to_signed(d).float(), steps=10)[:, 0].double() + 1) / 2).numpy()
        gain = np.mean([film_psnr(c, o) - film_psnr(c, x) for c, o, x in zip(films, out, d)])
        assert gain > 2.0, (kind, level.label, gain)


def test_benchmark_measures_learned_restorers_and_prints_the_targets(trained, tmp_path):
    "bench_restoration with --restorer: the learned restorers join the table, with the perception table and a line per target."
    out = tmp_path/'t.csv'
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'bench_restoration.py'), '--size', '32', '--films', '4', '--kinds', 'noise',
                        '--restorer', str(trained/'diffusion'), '--restorer', str(trained/'regression'), '--samples', '2', '--steps', '2',
                        '--csv', str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert any(l.startswith('target 1, diffusion x2 beats the best classical method') and '/3 levels' in l for l in lines), r.stdout[-1500:]
    assert any(l.startswith("target 2, FID of diffusion x2 below the regressor's") for l in lines)
    assert 'perception: FID / KID' in r.stdout and 'regression' in r.stdout
    assert any(l.startswith('best classical restorer per degradation') for l in lines)
    import pandas as pd
    assert {'diffusion x2', 'regression', 'nl_means'} <= set(pd.read_csv(out).method) and out.with_name('t_fid.csv').exists()
