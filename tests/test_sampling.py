"""Sampling: samplers against diffusers' own loop, per-image seeds, guidance modes, refusals, the cxr-sample CLI."""
import json, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from cxr_diffusion_nbs.core import project_root
from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, ConditioningConfig, guided_prediction
from cxr_diffusion_nbs.unet import unet_preset, make_noise_scheduler
from cxr_diffusion_nbs.sampling import (sample, make_sampler, SamplingError, image_seeds, trajectory_frame, trajectory_figure,
                                        initial_noise, loop_setup)
from cxr_diffusion_nbs.forward import predicted_x0, predicted_eps
import cli_in_process

BIN = Path(sys.executable).parent
DEMO = project_root()/'data'/'models'/'cpu64_demo'

@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    m = ConditionalDenoiser(unet_preset('tiny', image_size=16), ConditioningConfig()).eval()
    return m, make_noise_scheduler(m.unet_cfg)

def conds(n, S=16, F=5):
    lab = torch.zeros(n, F); lab[:, 1] = 1
    m = torch.zeros(n, 1, S, S); m[:, :, 4:9, 5:10] = 1
    return dict(labels=lab, mask=m)

@pytest.mark.parametrize('name', ['ddim', 'dpmpp'])
def test_matches_a_plain_diffusers_loop(tiny, name):
    "The exported loop equals the textbook loop over the same diffusers scheduler."
    m, ns = tiny
    c = conds(2)
    res = sample(m, ns, c, sampler=name, steps=8, seed=[3, 4])
    cls = DDIMScheduler if name == 'ddim' else DPMSolverMultistepScheduler
    extra = dict(set_alpha_to_one=False) if name == 'ddim' else dict(algorithm_type='dpmsolver++', solver_order=2)
    s = cls.from_config(ns.config, timestep_spacing='trailing', **extra); s.set_timesteps(8)
    x = initial_noise([3, 4], (1, 16, 16))
    with torch.no_grad():
        for t in s.timesteps: x = s.step(m(x, t.expand(2), **c), t, x).prev_sample
    torch.testing.assert_close(res.images, x.clamp(-1, 1), atol=1e-5, rtol=0)

@pytest.mark.parametrize('name,eta', [('ddpm', 0.), ('ddim', 1.), ('dpmpp', 0.)])
def test_seed_determines_image_alone(tiny, name, eta):
    m, ns = tiny
    a = sample(m, ns, conds(3), sampler=name, steps=6, eta=eta, seed=[7, 8, 9]).images
    b = sample(m, ns, conds(3), sampler=name, steps=6, eta=eta, seed=[7, 8, 9]).images
    assert torch.equal(a, b)
    alone = sample(m, ns, conds(1), sampler=name, steps=6, eta=eta, seed=[8]).images
    torch.testing.assert_close(alone[0], a[1], atol=1e-4, rtol=0)
    other = sample(m, ns, conds(1), sampler=name, steps=6, eta=eta, seed=[10]).images
    assert (other[0] - a[1]).abs().mean() > 1e-2

def test_ddim_eta_changes_only_when_stochastic(tiny):
    m, ns = tiny
    a = sample(m, ns, conds(1), sampler='ddim', steps=6, seed=1).images
    b = sample(m, ns, conds(1), sampler='ddim', steps=6, seed=1, eta=1.).images
    assert (a - b).abs().mean() > 1e-3

def test_guidance_modes(tiny):
    m, ns = tiny
    c = conds(2)
    plain = sample(m, ns, c, steps=5, seed=0).images
    nested = sample(m, ns, c, steps=5, seed=0, guidance=dict(labels=1, mask=1), guidance_mode='nested').images
    torch.testing.assert_close(nested, plain, atol=1e-4, rtol=0)
    strong = sample(m, ns, c, steps=5, seed=0, guidance=dict(labels=4, mask=1)).images
    assert (strong - plain).abs().mean() > 1e-4

def test_drop_switches_a_condition_off_per_image(tiny):
    m, ns = tiny
    c = conds(2)
    dropped = sample(m, ns, dict(c, drop={'mask': torch.tensor([True, False])}), steps=5, seed=[1, 2]).images
    no_mask = sample(m, ns, dict(labels=c['labels'][:1]), steps=5, seed=[1]).images
    with_mask = sample(m, ns, conds(1), steps=5, seed=[2]).images
    torch.testing.assert_close(dropped[0], no_mask[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(dropped[1], with_mask[0], atol=1e-4, rtol=0)

def test_predicted_eps_inverts_every_parametrisation():
    x0, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = torch.tensor([100, 700])
    for pt in ('epsilon', 'v_prediction', 'sample'):
        ns = make_noise_scheduler(prediction_type=pt)
        x_t = ns.add_noise(x0, eps, t)
        pred = {'epsilon': eps, 'v_prediction': ns.get_velocity(x0, eps, t), 'sample': x0}[pt]
        torch.testing.assert_close(predicted_eps(pred, x_t, t, ns), eps, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(predicted_x0(pred, x_t, t, ns), x0, atol=1e-4, rtol=1e-4)

def test_inputs_checked_once_per_request(tiny, monkeypatch):
    "Validation at the edge: `check_inputs` runs once per request, not at every step or guidance pass."
    m, ns = tiny
    calls, orig = [], m.check_inputs
    monkeypatch.setattr(m, 'check_inputs', lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    sample(m, ns, conds(2), steps=5, guidance=dict(labels=2, mask=1))
    assert len(calls) == 1

def test_loop_setup_restores_training_mode(tiny):
    m, _ = tiny
    m.train()
    try:
        with pytest.raises(RuntimeError):
            with loop_setup(m, [0, 1], range(3)) as s:
                assert not m.training and s.x.shape == (2, 1, 16, 16) and len(s.generators) == 2
                raise RuntimeError('inside the loop')
        assert m.training
    finally: m.eval()

def test_trajectory(tiny):
    m, ns = tiny
    r = sample(m, ns, conds(1), steps=6, seed=0, keep_trajectory=True)
    assert len(r.x_t) == len(r.x0) == len(r.timesteps) == 6 and r.timesteps[0] == 999
    xt, x0, t = trajectory_frame(r, 5)
    assert xt.shape == x0.shape == (16, 16) and t == r.timesteps[5]
    import matplotlib.pyplot as plt
    plt.close(trajectory_figure(r))
    with pytest.raises(SamplingError, match="'step'"): trajectory_frame(r, 6)

@pytest.mark.parametrize('kw,field', [
    (dict(sampler='euler'), "'sampler'"), (dict(steps=0), "'steps'"), (dict(steps=1001), "'steps'"),
    (dict(sampler='dpmpp', eta=.3), "'eta'"), (dict(guidance={'text': 1.}), 'no text conditioning'),
    (dict(guidance={'colour': 1.}), 'unknown condition'), (dict(guidance={'labels': float('nan')}), 'finite'),
    (dict(guidance_mode='joint'), "'guidance_mode'"), (dict(n=3), "'n'"), (dict(seed=[1, 2, 3]), "'seed'"),
    (dict(mixed_precision='fp8'), "'mixed_precision'")])
def test_refusals_before_compute(tiny, kw, field, monkeypatch):
    m, ns = tiny
    called = []
    monkeypatch.setattr(m, 'forward', lambda *a, **k: called.append(1))
    with pytest.raises(SamplingError, match=field): sample(m, ns, conds(2), **kw)
    assert not called

def test_wrong_mask_size_refused(tiny):
    m, ns = tiny
    from cxr_diffusion_nbs.conditioning import ConditioningError
    with pytest.raises(ConditioningError, match="'mask'"): sample(m, ns, dict(mask=torch.zeros(1, 1, 8, 8)))

def run_cli(*args, cwd=None):
    "`cxr-sample` in this process (`cli_in_process`); `test_cli_writes_marked_samples` runs the installed command."
    return cli_in_process.run_cli('cxr-sample', *args, cwd=cwd)

def test_cli_writes_marked_samples(tmp_path):
    from PIL import Image
    from cxr_diffusion_nbs.masks import box_to_mask
    mask = tmp_path/'mask.png'
    Image.fromarray((box_to_mask((20, 14, 34, 28), (64, 64)) * 255).astype(np.uint8)).save(mask)
    r = subprocess.run([str(BIN/'cxr-sample'), '--checkpoint', str(DEMO), '--finding', 'nodule', '--mask', str(mask), '--n', '2',
                        '--steps', '4', '--guidance', 'labels=2', '--seed', '5', '--output', str(tmp_path/'out')],
                       capture_output=True, text=True, timeout=600)        # the installed console script, as a user runs it
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path/'out'/'samples.json').read_text())
    assert meta['seeds'] == [5, 6] and meta['guidance'] == {'labels': 2.0} and len(meta['model_sha256']) == 64
    im = Image.open(tmp_path/'out'/'sample_000005.png')
    assert im.size == (64, 64) and 'SYNTHETIC' in im.text['Description']
    assert json.loads(im.text['Provenance'])['seed'] == 5

@pytest.mark.parametrize('args,msg', [
    (['--finding', 'hernia'], "not one of the model's findings"), (['--guidance', 'text=2'], 'no text conditioning'),
    (['--mask', 'BIG'], "'size'"), (['--sampler', 'dpmpp', '--steps', '5000'], "'steps'")])
def test_cli_refuses_before_writing(tmp_path, args, msg):
    from PIL import Image
    if 'BIG' in args:
        Image.fromarray(np.zeros((128, 128), np.uint8)).save(tmp_path/'big.png')
        args = [a if a != 'BIG' else str(tmp_path/'big.png') for a in args]
    r = run_cli('--checkpoint', str(DEMO), '--n', '1', '--output', str(tmp_path/'out'), *args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr[-2000:]
    assert not (tmp_path/'out').exists()

def test_text_guidance_on_a_text_model():
    "Per-condition guidance reaches the text condition on a model that has one (random token embeddings stand in)."
    torch.manual_seed(1)
    m = ConditionalDenoiser(unet_preset('tiny', image_size=16), ConditioningConfig(use_text=True)).eval()
    ns = make_noise_scheduler(m.unet_cfg)
    c = dict(conds(2), text_emb=torch.randn(2, 6, 384), text_mask=torch.ones(2, 6, dtype=torch.long))
    plain = sample(m, ns, c, steps=4, seed=0).images
    nested = sample(m, ns, c, steps=4, seed=0, guidance=dict(labels=1, mask=1, text=1), guidance_mode='nested').images
    torch.testing.assert_close(nested, plain, atol=1e-4, rtol=0)
    text3 = sample(m, ns, c, steps=4, seed=0, guidance=dict(labels=1, mask=1, text=3)).images
    text1 = sample(m, ns, c, steps=4, seed=0, guidance=dict(labels=1, mask=1, text=1)).images
    assert (text3 - text1).abs().mean() > 1e-5
    with pytest.raises(SamplingError, match='no text condition was passed'):
        sample(m, ns, conds(2), guidance=dict(text=2))

def test_cli_uses_the_recommended_guidance_for_the_conditions_given(tmp_path):
    "No --guidance and no --mask: the demo's recommended scales apply to what the request has (labels), as generate does."
    r = run_cli('--checkpoint', str(DEMO), '--finding', 'nodule', '--n', '1', '--steps', '2', '--output', str(tmp_path/'out'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path/'out'/'samples.json').read_text())['guidance'] == {'labels': 4.0}

def test_cli_checks_its_output_folder_before_drawing(tmp_path):
    "An output path that is a file, or a folder of earlier samples, is refused before any sampling; --overwrite replaces them."
    (tmp_path/'file').write_text('x')
    r = run_cli('--checkpoint', str(DEMO), '--n', '1', '--steps', '2', '--output', str(tmp_path/'file'))
    assert r.returncode == 2 and 'is a file, not a folder' in r.stderr, r.stderr[-2000:]
    out = tmp_path/'out'
    assert run_cli('--checkpoint', str(DEMO), '--n', '2', '--steps', '2', '--output', str(out)).returncode == 0
    r = run_cli('--checkpoint', str(DEMO), '--n', '1', '--steps', '2', '--seed', '9', '--output', str(out))
    assert r.returncode == 2 and 'earlier output' in r.stderr and '--overwrite' in r.stderr, r.stderr[-2000:]
    r = run_cli('--checkpoint', str(DEMO), '--n', '1', '--steps', '2', '--seed', '9', '--output', str(out), '--overwrite')
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(f.name for f in out.glob('sample_*.png')) == ['sample_000009.png']     # no mix of old and new

def test_the_note_says_what_made_the_image(tmp_path):
    "cxr-sample marks a GAN's images as a GAN's (the shipped gan64, in process: a second), a latent model's as latent diffusion."
    from PIL import Image
    from cxr_diffusion_nbs.sampling import main, write_samples, SYNTHETIC_NOTE
    main(['--checkpoint', str(DEMO.parent/'gan64'), '--finding', 'nodule', '--n', '2', '--output', str(tmp_path/'gan')])
    for f in ('sample_000000.png', 'grid.png'):
        note = Image.open(tmp_path/'gan'/f).text['Description']
        assert note.startswith('SYNTHETIC chest X-ray generated by a GAN (cxr_diffusion_nbs)') and 'model' not in note
    assert json.loads(Image.open(tmp_path/'gan'/'sample_000001.png').text['Provenance'])['kind'] == 'gan'
    write_samples(tmp_path/'lat', torch.zeros(1, 1, 8, 8), [0], dict(kind='latent-diffusion'))
    assert 'generated by a latent diffusion model' in Image.open(tmp_path/'lat'/'sample_000000.png').text['Description']
    write_samples(tmp_path/'px', torch.zeros(1, 1, 8, 8), [0], dict(kind='pixel-diffusion'))
    assert Image.open(tmp_path/'px'/'sample_000000.png').text['Description'] == SYNTHETIC_NOTE
    assert 'generated by a diffusion model' in SYNTHETIC_NOTE
