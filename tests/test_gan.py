"""Tests of the GAN baseline (cxr_diffusion_nbs.gan): refused configs, a run killed and resumed repeating the
uninterrupted one exactly, a diverged step named, the trained GAN opened by `load_generator` as kind 'gan' (same seed,
same image; masks, text and diffusion options refused by name), drawn from by `cxr-sample`, the command line, and the
shipped model."""
import json
from pathlib import Path

import pytest
import torch

from cxr_diffusion_nbs.checkpoints import CheckpointError, WEIGHTS_NAME, read_weights
from cxr_diffusion_nbs.core import ConfigError, TrainingDivergedError, sample_data_root
from cxr_diffusion_nbs.generators import GENERATOR_KINDS, SamplingError, load_generator
from cxr_diffusion_nbs.gan import (GANGenerator, ConditionalGenerator, build_gan_run, gan_train_step, load_gan_config,
                                   train_gan, main)
from cli_in_process import run_cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT/'data'/'models'/'gan64'
TINY = [f'data.root={sample_data_root()}', 'data.image_size=32', 'data.limit=12', 'optim.batch_size=4', 'optim.max_steps=4',
        'model.g_channels=4', 'model.d_channels=4', 'model.z_dim=16', 'model.embed_dim=8', 'output.log_every=2',
        'output.checkpoint_every=2', 'output.sample_every=null', 'output.progress=false', 'optim.cpu=true', 'loss.r1_every=2']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "One thread: the machine is shared, and equal thread counts keep float results comparable."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "A GAN trained four steps on 12 films of the bundled sample at 32 px (seconds); its run folder."
    out = tmp_path_factory.mktemp('gan')/'run'
    train_gan({}, TINY + [f'output.output_dir={out}'])
    return out


@pytest.mark.parametrize('ov,field', [('optim.batch_sise=4', 'batch_size'), ('loss.kind=wgan', "'loss.kind'"),
                                      ('data.image_size=48', "'data.image_size'"), ('modle.z_dim=3', "did you mean 'model'"),
                                      ('data.findings=[hernia_x]', r"'data.findings\[0\]'"), ('optim.mixed_precision=fp16', 'gradient scaler')])
def test_config_refusals_name_the_field(ov, field):
    with pytest.raises(ConfigError, match=field): load_gan_config(ROOT/'configs'/'gan64.yaml', [ov])


def test_shipped_config_is_valid():
    cfg = load_gan_config(ROOT/'configs'/'gan64.yaml')
    assert cfg.data.image_size == 64 and cfg.optim.max_minutes <= 30 and cfg.data.test_fraction == 0.25


def test_killed_and_resumed_run_repeats_the_uninterrupted_one(tmp_path, tiny_run):
    cut = tmp_path/'cut'
    assert train_gan({}, TINY + [f'output.output_dir={cut}'], stop_after=2) == dict(stopped_at=2, last_checkpoint='checkpoint-2')
    with pytest.raises(ConfigError, match='--resume auto'): train_gan({}, TINY + [f'output.output_dir={cut}'])
    with pytest.raises(ConfigError, match='another network'):
        train_gan({}, TINY + [f'output.output_dir={cut}', 'output.resume=auto', 'model.g_channels=8'])
    s = train_gan({}, TINY + [f'output.output_dir={cut}', 'output.resume=auto'])
    assert (s['start_step'], s['steps'], s['images_seen']) == (2, 4, 16)
    for sub in ('generator', 'g', 'd'):
        a = read_weights((tiny_run/'checkpoint-4'/sub/WEIGHTS_NAME))
        b = read_weights((cut/'checkpoint-4'/sub/WEIGHTS_NAME))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), sub
    log = (cut/'log.csv').read_text().splitlines()
    assert [r.split(',')[0] for r in log[1:]] == ['2', '4']          # the resume rewound nothing twice


def test_a_nonfinite_step_stops_the_run_naming_it(tmp_path):
    cfg = load_gan_config({}, TINY + [f'output.output_dir={tmp_path}'])
    run = build_gan_run(cfg)
    gan_train_step(run)
    run.images[:] = float('nan')
    with pytest.raises(TrainingDivergedError, match=r"step 2.*discriminator loss is nan"): gan_train_step(run)
    assert run.step == 1


def test_load_generator_opens_the_gan(tiny_run):
    assert GENERATOR_KINDS['gan'] == GANGenerator.load                  # registered by gan itself: no loader string
    assert json.loads((tiny_run/'generator.json').read_text())['kind'] == 'gan'
    for path in (tiny_run, tiny_run/'checkpoint-4'):
        gen = load_generator(path, device='cpu')
        assert isinstance(gen, GANGenerator) and gen.kind == 'gan' and gen.conditions == ('labels',) and gen.mask_mode is None
        assert gen.image_size == 32 and gen.findings == ('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly')
    a = gen.generate(findings='nodule', seed=5, n=3)
    assert a.shape == (3, 1, 32, 32) and a.abs().max() <= 1
    b = gen.generate(findings=['nodule'], seed=[7, 5])                      # image i of seed s is drawn from seed s + i,
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])              # whatever else is in the batch
    c = gen.generate(findings=[['nodule'], [], ['mass', 'effusion']], seed=0)
    assert c.shape[0] == 3
    assert not torch.equal(gen.generate(findings='mass', seed=5), a[:1])   # the label changes the image
    p = gen.provenance()
    assert p['kind'] == 'gan' and len(p['model_sha256']) == 64 and p['weights'] == WEIGHTS_NAME and '/' not in p['checkpoint']


def test_a_run_killed_before_its_end_opens_at_its_newest_checkpoint(tmp_path):
    train_gan({}, TINY + [f'output.output_dir={tmp_path}'], stop_after=2)
    gen = GANGenerator.load(tmp_path, device='cpu')
    assert gen.checkpoint.name == 'checkpoint-2'


@pytest.mark.parametrize('kw,field', [(dict(masks=torch.zeros(1, 32, 32)), "'masks'.*labels only"), (dict(text='a nodule'), "'text'"),
                                      (dict(steps=4), "'steps'.*diffusion option"), (dict(sampler='ddim'), "'sampler'"),
                                      (dict(guidance={'labels': 2.}), "'guidance'"), (dict(truncaton=1.), "did you mean 'truncation'"),
                                      (dict(truncation=0), "'truncation'"), (dict(findings='hernia'), "'findings'"),
                                      (dict(labels=torch.ones(2, 4)), "'labels'"), (dict(seed=[1, 2], n=3), "'seed'")])
def test_refusals_name_the_field(tiny_run, kw, field):
    gen = GANGenerator.load(tiny_run, device='cpu')
    with pytest.raises(SamplingError, match=field): gen.generate(**kw)


def test_diffusion_defaults_are_accepted_as_not_set(tiny_run):
    "What cxr-sample and the evaluation code pass when the user sets no diffusion option (the diffusion defaults) is fine."
    gen = GANGenerator.load(tiny_run, device='cpu')
    o = gen.check_options('x', sampler='dpmpp', steps=None, eta=0.0, mixed_precision='no')
    assert o['sampler'] is None and o['guidance'] == {} and o['truncation'] is None
    t = gen.generate(seed=3, truncation=0.5)
    assert torch.equal(t, gen.generate(seed=3, truncation=0.5, sampler='dpmpp', guidance={}))
    assert gen.latents([3], 0.5).abs().max() <= 0.5


def test_cxr_sample_draws_from_the_gan(tiny_run, tmp_path):
    from PIL import Image
    r = run_cli('cxr-sample', '--checkpoint', tiny_run, '--finding', 'nodule', '--n', '2', '--seed', '5', '--output', tmp_path/'out')
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path/'out'/'samples.json').read_text())
    assert meta['kind'] == 'gan' and meta['seeds'] == [5, 6] and meta['findings'] == ['nodule']
    assert Image.open(tmp_path/'out'/'sample_000005.png').size == (32, 32)
    r = run_cli('cxr-sample', '--checkpoint', tiny_run, '--steps', '4', '--output', tmp_path/'o2')
    assert r.returncode == 2 and "'steps'" in r.stderr and not (tmp_path/'o2').exists()


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: main([str(ROOT/'configs'/'gan64.yaml'), '--set', 'loss.kind=wgan'])
    assert e.value.code == 2 and "'loss.kind'" in capsys.readouterr().err
    main([str(ROOT/'configs'/'gan64.yaml'), '--output', str(tmp_path/'r'), '--set', *TINY, 'optim.max_steps=2'])
    assert json.loads(capsys.readouterr().out)['steps'] == 2


@pytest.mark.skipif(not (SHIPPED/'generator.json').exists(), reason='the shipped GAN is not there yet')
def test_shipped_gan_opens_and_draws():
    gen = load_generator(SHIPPED, device='cpu')
    assert gen.kind == 'gan' and gen.image_size == 64
    x = gen.generate(findings='effusion', seed=0, n=2)
    assert x.shape == (2, 1, 64, 64) and x.std() > 0.1
    assert (SHIPPED/'generator'/WEIGHTS_NAME).stat().st_size < 5e6


def test_latent_optimisation_raises_the_classifier_probability(tiny_run):
    from cxr_diffusion_nbs.gan import optimise_latents, prior_penalty
    gen = GANGenerator.load(tiny_run, device='cpu')
    free = optimise_latents(gen, 'effusion', n=3, steps=4, lr=0.1, prior_weight=0.)
    assert free.history['p'].is_monotonic_increasing and free.p_after.shape == (3, 5)
    held = optimise_latents(gen, 'effusion', n=3, steps=4, lr=0.1, prior_weight=1.)
    assert held.history['prior'].iloc[-1] < held.history['prior'].iloc[0]
    assert torch.equal(free.z0, gen.latents([0, 1, 2])) and torch.equal(free.before, gen.generate(findings='effusion', seed=0, n=3))
    s = free.summary()
    assert s['p_after'] >= s['p_before'] and s['n'] == 3
    assert torch.equal(prior_penalty(torch.ones(2, 4)), torch.zeros(2))
    with pytest.raises(Exception, match="'finding'"): optimise_latents(gen, 'hernia')


def test_judge_size_averages_a_large_draw_down_without_aliasing():
    from cxr_diffusion_nbs.gan import judge_size
    x = torch.zeros(1, 1, 256, 256)
    x[..., ::4, :] = 1.                         # a one-pixel line every 4 px: at 64 px only its mean (0.25) may survive
    y = judge_size(x, 64)                       # (plain bilinear sampling falls between the lines: 0 everywhere)
    assert y.shape == (1, 1, 64, 64) and (y[..., 1:-1, :] - 0.25).abs().max() < 0.02
    assert judge_size(y, 64) is y


def test_a_screened_gan_keeps_the_best_of_its_candidates():
    "The rarity study's 'screened' arm wraps the generator in `ScreenedGenerator`, which reads its conditions through `inputs`."
    from cxr_diffusion_nbs.screening import ScreenedGenerator, load_screener
    s = ScreenedGenerator(load_generator(SHIPPED, 'cpu'), load_screener(), 3)
    labels = torch.eye(len(s.findings))[[s.findings.index('effusion'), s.findings.index('nodule')]]
    x = s.generate(labels=labels, seed=0)
    assert x.shape == (2, 1, 64, 64) and s.last_scores.shape == (2, 3)
    draws, scores = s.draw_candidates(labels=labels, seed=0)
    for i in range(2): assert torch.equal(x[i], draws[i, scores[i].argmax()])
    assert s.provenance()['kind'] == 'gan+screened'
    with pytest.raises(SamplingError, match="'masks'"): s.generate(findings='effusion', masks=torch.ones(1, 64, 64))
