"""Tests of the autoencoder (cxr_diffusion_nbs.vae): the diffusers folder round trip and the latent statistics in its
config, encode/decode shapes at factors 4 and 8, refused configs and weights files (named in the message), a run
interrupted and resumed repeating the uninterrupted one exactly, the command line, and the shipped model."""
import json, re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from skimage.metrics import structural_similarity

from cxr_diffusion_nbs.checkpoints import CheckpointError, WEIGHTS_NAME
from cxr_diffusion_nbs.core import ConfigError, sample_data_root
from cxr_diffusion_nbs.dataset import CXRDataset, CropSampler
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.vae import (build_autoencoder, decode, downsampling_factor, encode,
                                   latent_shape, latent_statistics, load_autoencoder, load_vae_config, main,
                                   reconstruction_metrics, save_autoencoder, ssim_map, train_autoencoder)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT/'configs'/'vae256.yaml'
SHIPPED = ROOT/'data'/'models'/'cpu256_latent_demo'


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "One thread: the machine is shared, and equal thread counts keep float results comparable."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def films():
    "Six real 256-px validation films of the bundled sample (the same whichever data set is the default), with masks."
    man = load_shared_subset(sample_data_root())
    ds = CXRDataset(man, findings=man.findings, size=256, split='val', mask_mode='union')
    outlined = set(man.annotations.image_id)
    idx = [i for i in range(len(ds)) if ds._ids[i] in outlined][:3] + [i for i in range(len(ds)) if ds._ids[i] not in outlined][:3]
    return [ds[i] for i in idx]


def quick(out, *extra):
    "A tiny run: 32-px crops of 16 training films, batch 4, float32, checkpoint every 3 steps, no final evaluation."
    return [f'output.output_dir={out}', 'model.preset=tiny', 'data.crop_size=32', 'data.limit=16', 'optim.batch_size=4',
            'optim.max_steps=6', 'optim.warmup_steps=2', 'optim.mixed_precision=no', 'output.log_every=2',
            'output.checkpoint_every=3', 'output.stats_images=4', 'output.final_eval=false', 'output.progress=false', *extra]


def test_save_load_round_trip_keeps_weights_and_latent_statistics(tmp_path, films):
    torch.manual_seed(0)
    ae = build_autoencoder('tiny').eval()
    x = torch.stack([f['image'] for f in films[:4]])
    shift, scale = latent_statistics(ae, x)
    assert (ae.config.shift_factor, ae.config.scaling_factor) == (shift, scale)
    z = encode(ae, x)
    assert abs(z.mean().item()) < 1e-3 and abs(z.std().item() - 1) < 1e-2        # unit scale on the images measured
    save_autoencoder(ae, tmp_path/'vae')
    cfg = json.loads((tmp_path/'vae'/'config.json').read_text())
    assert (cfg['shift_factor'], cfg['scaling_factor']) == (shift, scale)
    assert cfg['in_channels'] == cfg['out_channels'] == 1 and str(tmp_path) not in json.dumps(cfg)
    plain = AutoencoderKL.from_pretrained(tmp_path, subfolder='vae')
    own = {k: v for k, v in ae.state_dict().items()}
    assert all(torch.equal(own[k], v) for k, v in plain.state_dict().items())
    for opened in (load_autoencoder(tmp_path, device='cpu'), load_autoencoder(tmp_path/'vae', device='cpu'),
                   load_autoencoder(tmp_path, device='cpu', subfolder='vae')):
        assert torch.equal(encode(opened, x), z)
    save_autoencoder(ae, tmp_path/'half', dtype=torch.float16)                   # shipped weights: float16 on disk
    assert (tmp_path/'half'/WEIGHTS_NAME).stat().st_size < 0.6 * (tmp_path/'vae'/WEIGHTS_NAME).stat().st_size
    half = load_autoencoder(tmp_path/'half', device='cpu')
    assert next(half.parameters()).dtype == torch.float32
    assert (decode(half, encode(half, x)) - decode(ae, z)).abs().max() < 0.05


@pytest.mark.parametrize('preset,factor', [('tiny', 4), ('tiny_f8', 8)])
def test_encode_decode_shapes_and_determinism(preset, factor):
    torch.manual_seed(0)
    ae = build_autoencoder(preset).eval()
    ae.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    assert downsampling_factor(ae) == factor
    assert latent_shape(ae, 64) == (4, 64 // factor, 64 // factor) and latent_shape(ae, (64, 128)) == (4, 64 // factor, 128 // factor)
    z = encode(ae, x, batch_size=1)
    assert z.shape == (3, 4, 64 // factor, 64 // factor) and not z.requires_grad
    torch.testing.assert_close(encode(ae, x, batch_size=3), z, rtol=0, atol=1e-5)   # batching does not change a latent
    with torch.no_grad(): mean = ae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, (mean - 0.1) * 2.0, rtol=0, atol=1e-5)            # the mean, normalised
    r = decode(ae, z, batch_size=2)
    assert r.shape == x.shape and r.min() >= -1 and r.max() <= 1
    with torch.no_grad(): ref = ae.decode(z / 2.0 + 0.1).sample.clamp(-1, 1)
    torch.testing.assert_close(r, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match='multiple of the downsampling factor'): encode(ae, x[..., :62, :62])
    with pytest.raises(ValueError, match=r'\[-1, 1\]'): encode(ae, x * 10)


def test_bad_config_fields_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"vae256\.yaml: field 'model\.overrides\.latent_chanels'.*did you mean 'latent_channels'"):
        load_vae_config(CONFIG, ['model.overrides.latent_chanels=4'])
    with pytest.raises(ConfigError, match=r"field 'data\.crop_size'.*downsampling factor 8"):
        load_vae_config(CONFIG, ['model.preset=cpu_f8', 'data.crop_size=36'])
    bad = tmp_path/'bad.yaml'
    bad.write_text('loss:\n  kl_wieght: 1.0e-6\n')
    with pytest.raises(ConfigError, match=r"bad\.yaml: field 'loss\.kl_wieght'.*did you mean 'kl_weight'"):
        load_vae_config(bad)


def test_missing_or_corrupt_weights_are_refused_naming_the_file(tmp_path):
    ae = build_autoencoder('tiny')
    ae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    save_autoencoder(ae, tmp_path/'m')
    wf = tmp_path/'m'/WEIGHTS_NAME
    wf.write_bytes(wf.read_bytes()[:1000])                                        # truncated
    with pytest.raises(CheckpointError, match=re.escape(str(wf))): load_autoencoder(tmp_path/'m')
    wf.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(wf)) + ".*missing"): load_autoencoder(tmp_path/'m')
    with pytest.raises(CheckpointError, match='does not exist'): load_autoencoder(tmp_path/'nowhere')
    build_autoencoder('tiny').save_pretrained(tmp_path/'raw')                    # saved before latent_statistics
    with pytest.raises(CheckpointError, match=r"config\.json: field 'shift_factor'"): load_autoencoder(tmp_path/'raw')
    rgb = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), norm_num_groups=8, shift_factor=0.0)
    rgb.save_pretrained(tmp_path/'rgb')
    with pytest.raises(CheckpointError, match=r"field 'in_channels'"): load_autoencoder(tmp_path/'rgb')


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    "With the discriminator on from step 2, so that its weights and optimiser are part of what must be restored."
    disc = ['loss.disc_weight=0.1', 'loss.disc_start=2', 'loss.disc_channels=8', 'loss.disc_layers=2']
    full = train_autoencoder(CONFIG, quick(tmp_path/'full', *disc))
    assert full['steps'] == 6 and full['crops_seen'] == 24
    killed = train_autoencoder(CONFIG, quick(tmp_path/'cut', *disc), stop_after=3)
    assert killed == {'stopped_at': 3, 'last_checkpoint': 'checkpoint-3'} and not (tmp_path/'cut'/'vae').exists()
    with pytest.raises(ConfigError, match='--resume auto'): train_autoencoder(CONFIG, quick(tmp_path/'cut', *disc))
    with pytest.raises(ConfigError, match=r"field 'model\.block_out_channels'"):
        train_autoencoder(CONFIG, quick(tmp_path/'cut', *disc, 'output.resume=auto', 'model.overrides.block_out_channels=[8, 16, 32]'))
    resumed = train_autoencoder(CONFIG, quick(tmp_path/'cut', *disc, 'output.resume=auto'))
    assert resumed['start_step'] == 3 and resumed['steps'] == 6 and resumed['crops_seen'] == 24
    a, b = load_file(str(tmp_path/'full'/'vae'/WEIGHTS_NAME)), load_file(str(tmp_path/'cut'/'vae'/WEIGHTS_NAME))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    da = load_file(str(tmp_path/'full'/'checkpoint-6'/'discriminator.safetensors'))
    db = load_file(str(tmp_path/'cut'/'checkpoint-6'/'discriminator.safetensors'))
    assert all(torch.equal(da[k], db[k]) for k in da)
    la, lb = (tmp_path/'full'/'log.csv').read_text(), (tmp_path/'cut'/'log.csv').read_text()
    strip = lambda t: [l.split(',')[:-2] for l in t.splitlines()]                # without crops/s and elapsed
    assert strip(la) == strip(lb) and len(la.splitlines()) == 4
    assert (full['shift_factor'], full['scaling_factor']) == (resumed['shift_factor'], resumed['scaling_factor'])


def test_command_line(tmp_path, capsys):
    main(['--config', str(CONFIG), '--output', str(tmp_path/'run'), '--set', *quick(tmp_path/'ignored')[1:], 'optim.max_steps=2'])
    summary = json.loads(capsys.readouterr().out)
    assert summary['steps'] == 2 and summary['vae'] == 'vae' and str(tmp_path) not in json.dumps(summary)
    ae = load_autoencoder(tmp_path/'run', device='cpu')
    assert ae.config.shift_factor == summary['shift_factor']
    with pytest.raises(SystemExit) as e: main(['--config', str(CONFIG), '--set', 'optim.batch_size=0'])
    assert e.value.code == 2 and "field 'optim.batch_size'" in capsys.readouterr().err


def test_crop_sampler_centres_lesion_crops_on_lesions():
    ims = torch.zeros(3, 1, 64, 64, dtype=torch.float16)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool); masks[1, 50:54, 5:9] = True
    s = CropSampler(ims, masks, crop=16, lesion_fraction=1.0)
    x, m = s.draw(20, torch.Generator().manual_seed(0), with_masks=True)
    assert x.shape == (20, 1, 16, 16) and (m.flatten(1).sum(1) > 0).all()
    idx, top, left, lesion = CropSampler(ims, masks, crop=16, lesion_fraction=0.0).positions(50, torch.Generator().manual_seed(0))
    assert not lesion.any() and top.max() <= 48 and left.max() <= 48


def test_training_ssim_is_scikit_image_ssim():
    torch.manual_seed(0)
    a = torch.rand(1, 1, 40, 40, dtype=torch.float64)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    ref = structural_similarity(a[0, 0].numpy(), b[0, 0].numpy(), data_range=1.0)
    assert abs(ssim_map(a, b, gaussian=False).mean().item() - ref) < 1e-9


def test_shipped_model_opens_and_reconstructs_bundled_films(films):
    plain = AutoencoderKL.from_pretrained(SHIPPED, subfolder='vae')
    assert plain.config.in_channels == 1 and plain.config.shift_factor is not None
    ae = load_autoencoder(SHIPPED, device='cpu')
    assert next(ae.parameters()).dtype == torch.float32 and latent_shape(ae, 256)[1:] == (64, 64)
    x = torch.stack([f['image'] for f in films[:2]])
    r = decode(ae, encode(ae, x))
    blocky = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode='bilinear', align_corners=False)
    for i in range(len(x)):
        ours, base = reconstruction_metrics(x[i], r[i], films[i]['mask']), reconstruction_metrics(x[i], blocky[i], films[i]['mask'])
        assert ours['psnr'] > base['psnr'] + 1.5 and ours['ssim'] > base['ssim'] + .02, (ours, base)   # a clear margin, not noise
        if films[i]['mask'].sum(): assert ours['lesion_ssim'] > base['lesion_ssim']
    facts = json.loads((SHIPPED/'vae'/'training.json').read_text())
    assert facts['steps'] > 0 and facts['validation']['n_images'] > 0
    for f in (SHIPPED/'vae').glob('*.json'):
        assert not re.search(r'/(work|home|tmp|root|Users)/', f.read_text()), f'{f.name} holds a machine path'


@pytest.mark.parametrize('override,field', [('optim.lr=.inf', 'optim.lr'), ('optim.lr=.nan', 'optim.lr'),
                                            ('optim.betas=[.inf, 0.99]', 'optim.betas[0]'), ('loss.kl_weight=.inf', 'loss.kl_weight'),
                                            ('loss.disc_lr=.inf', 'loss.disc_lr'),
                                            ('optim.max_minutes=.inf', 'optim.max_minutes')])
def test_non_finite_settings_are_refused(override, field):
    with pytest.raises(ConfigError, match=rf"vae256\.yaml: field '{re.escape(field)}': .*not a finite number"):
        load_vae_config(CONFIG, [override])


def test_output_folder_that_is_a_file_is_refused_before_loading_films(tmp_path):
    f = tmp_path/'taken'; f.write_text('')
    with pytest.raises(ConfigError, match=r"field 'output\.output_dir': .*is a file, not a folder"):
        train_autoencoder(CONFIG, quick(f))


def test_nan_films_stop_the_run_naming_step_and_films(tmp_path, monkeypatch, capsys):
    "A batch of crops holding NaN (a corrupt film): the CLI stops at step 1 naming the films, exit 1, no checkpoint."
    get = CXRDataset.__getitem__
    def poisoned(self, i):
        it = dict(get(self, i)); it['image'] = torch.full_like(it['image'], float('nan'))
        return it
    monkeypatch.setattr(CXRDataset, '__getitem__', poisoned)
    out = tmp_path/'run'
    with pytest.raises(SystemExit) as e:
        main(['--config', str(CONFIG), '--output', str(out), '--set', *quick(tmp_path/'ignored')[1:], 'data.limit=4',
              'output.checkpoint_every=1'])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and err.startswith('cxr-train-autoencoder: training stopped: '), err
    assert "field 'step 1': the loss is nan on crops of the films [" in err, err
    assert not list(out.glob('checkpoint-*')) and not (out/'vae').exists() and not (out/'summary.json').exists()


def test_non_finite_autoencoder_is_neither_saved_nor_loaded(tmp_path):
    ae = build_autoencoder('tiny')
    ae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    save_autoencoder(ae, tmp_path/'ok')
    wf = tmp_path/'ok'/WEIGHTS_NAME
    from safetensors.torch import save_file
    sd = load_file(str(wf)); name = sorted(sd)[0]
    sd[name] = sd[name].clone(); sd[name].view(-1)[0] = float('nan'); save_file(sd, str(wf))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: field '{re.escape(name)}': holds NaN or infinite"):
        load_autoencoder(tmp_path/'ok', device='cpu')
    with torch.no_grad(): dict(ae.named_parameters())[name].fill_(float('inf'))
    with pytest.raises(CheckpointError, match=rf"bad/{WEIGHTS_NAME}: field '{re.escape(name)}'.*not written"):
        save_autoencoder(ae, tmp_path/'bad')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ok']


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path):
    "load_ae_checkpoint reads through checkpoints.read_weights: a truncated file is a CheckpointError naming it."
    from types import SimpleNamespace
    from cxr_diffusion_nbs.vae import load_ae_checkpoint
    ck = tmp_path/'checkpoint-3'
    ae = build_autoencoder('tiny'); ae.save_pretrained(ck/'vae', safe_serialization=True)
    (ck/'train_state.json').write_text('{"step": 3}')
    wf = ck/'vae'/WEIGHTS_NAME
    wf.write_bytes(wf.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=re.escape(str(wf)) + r": field '<file>': not a readable safetensors file"):
        load_ae_checkpoint(SimpleNamespace(device=torch.device('cpu'), ae=ae), ck)
