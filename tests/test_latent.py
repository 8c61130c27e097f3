"""Latent diffusion end to end on a tiny autoencoder: the latent cache (09c_latents), a latent training run
(`model.autoencoder`), its checkpoint (autoencoder inside, kind 'latent-diffusion'), resume, and the generator that
`load_generator` opens for it (masks at image size, decoded images), through `cxr-sample` too."""
import json, os, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_diffusion_nbs import load_generator
from cxr_diffusion_nbs.core import ConfigError, find_data_root
from cxr_diffusion_nbs.dataset import Augment, CXRDataset
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.latents import (LatentDataset, pool_mask, cached_latents, load_latent_cache, save_latent_cache,
                                       autoencoder_fingerprint)
from cxr_diffusion_nbs.sampling import LatentDiffusionGenerator, main as sample_main
from cxr_diffusion_nbs.training import load_config, train
from cxr_diffusion_nbs.vae import build_autoencoder, latent_statistics, save_autoencoder, encode, decode

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/'configs'/'tiny.yaml'
SIZE = 64          # films; the tiny autoencoder (factor 4) makes 16 x 16 latents


def tiny_autoencoder(folder, seed=0):
    "An untrained tiny autoencoder with its latent statistics measured on a few bundled films, saved to `folder`."
    torch.manual_seed(seed)
    ae = build_autoencoder('tiny')
    ds = CXRDataset(load_shared_subset(find_data_root()), size=SIZE, split='train')
    latent_statistics(ae, torch.stack([ds[i]['image'] for i in range(8)]))
    return save_autoencoder(ae, folder)


@pytest.fixture(scope='module')
def ae_dir(tmp_path_factory):
    return tiny_autoencoder(tmp_path_factory.mktemp('ae')/'vae')


def latent_cfg(out, ae, *overrides):
    return load_config(TINY, [f'output.output_dir={out}', 'output.progress=false', f'model.autoencoder={ae}',
                              f'data.image_size={SIZE}', 'loss.ssim_weight=0', 'data.augment=true',
                              'data.latent_variants=2', 'data.limit=12', *overrides])


@pytest.fixture(scope='module')
def latent_run(tmp_path_factory, ae_dir):
    out = tmp_path_factory.mktemp('latent_run')
    summary = train(latent_cfg(out, ae_dir, 'optim.max_steps=4', 'output.checkpoint_every=2', 'output.sample_every=4'))
    return out, summary


def test_pool_mask_keeps_area_and_small_lesions():
    m = torch.zeros(2, 1, 32, 32); m[0, :, 5:8, 9:11] = 1
    p = pool_mask(m, 4)
    assert p.shape == (2, 1, 8, 8) and float(p.sum() * 16) == pytest.approx(float(m.sum()))
    assert float(p.max()) < 1 and int((p > 0).sum()) > 0            # a lesion smaller than a cell survives as a fraction
    with pytest.raises(ValueError, match='multiple of the downsampling factor'): pool_mask(torch.ones(10, 10), 4)


def test_latent_dataset_variants_and_cache(tmp_path, ae_dir):
    from cxr_diffusion_nbs.vae import load_autoencoder
    ae = load_autoencoder(ae_dir, device='cpu')
    man = load_shared_subset(find_data_root())
    ds = LatentDataset(man, ae, variants=2, size=SIZE, split='val', augment=Augment())
    assert len(ds) == len(CXRDataset(man, size=SIZE, split='val'))
    it = ds[0]
    assert it['image'].shape == (4, 16, 16) and it['mask'].shape == (1, 16, 16)
    assert torch.equal(it['image'], encode(ae, ds.pixel_item(0)['image'][None])[0].half().float())
    ds.set_epoch(1); other = ds[0]['image']; ds.set_epoch(0)
    assert not torch.equal(other, it['image'])                    # variant 1: an augmented film, encoded separately
    with pytest.raises(ValueError, match='variants'): LatentDataset(man, ae, variants=2, size=SIZE, split='val')
    small = LatentDataset(man, ae, variants=1, size=SIZE, split='val')
    with pytest.raises(ValueError, match='encode_all'): save_latent_cache(small, tmp_path/'c')
    cached_latents(small, tmp_path/'c')
    again = LatentDataset(man, ae, variants=1, size=SIZE, split='val')
    assert load_latent_cache(again, tmp_path/'c') and torch.equal(again[3]['image'], small[3]['image'])
    assert not (tmp_path/'.tmp-c').exists()
    # another autoencoder's latents are never mixed in
    other_ae = load_autoencoder(tiny_autoencoder(tmp_path/'ae2', seed=1), device='cpu')
    assert autoencoder_fingerprint(other_ae) != autoencoder_fingerprint(ae)
    assert not load_latent_cache(LatentDataset(man, other_ae, variants=1, size=SIZE, split='val'), tmp_path/'c')


def test_latent_config_derives_the_unet(ae_dir, tmp_path):
    from cxr_diffusion_nbs.training import unet_config, conditioning_config, loss_config
    cfg = latent_cfg(tmp_path, ae_dir)
    u = unet_config(cfg)
    assert (u.in_channels, u.out_channels, u.image_size, u.clip_sample) == (4, 4, 16, False)
    assert conditioning_config(cfg).soft_mask and loss_config(cfg).ssim_weight == 0
    for ov, field in [('loss.ssim_weight=0.1', 'loss.ssim_weight'), ('model.overrides.in_channels=1', 'model.overrides.in_channels'),
                      (f'model.autoencoder={tmp_path}/none', 'model.autoencoder'), ('data.latent_variants=0', 'data.latent_variants')]:
        with pytest.raises(ConfigError, match=field.replace('.', r'\.')): latent_cfg(tmp_path, ae_dir, ov)
    with pytest.raises(ConfigError, match='model.autoencoder'):      # a folder that is not an autoencoder
        latent_cfg(tmp_path, tmp_path)


def test_latent_run_checkpoint_holds_its_autoencoder(latent_run, ae_dir):
    out, s = latent_run
    assert s['steps'] == 4
    ck = out/'checkpoint-4'
    assert json.loads((ck/'generator.json').read_text()) == {'kind': 'latent-diffusion', 'parts': ['vae']}
    assert (ck/'vae'/'config.json').exists() and (ck/'vae'/'diffusion_pytorch_model.safetensors').exists()
    assert '_name_or_path' not in json.loads((ck/'vae'/'config.json').read_text())     # no machine path
    assert (out/'latents'/'latents.safetensors').exists() and not list(out.glob('.tmp-*'))
    meta = json.loads((out/'latents'/'latents.json').read_text())
    assert meta['variants'] == 2 and len(meta['texts']) == 2 * 12
    assert (out/'samples'/'step-0000004.png').exists()


def test_resume_reuses_the_cache_and_refuses_another_autoencoder(latent_run, ae_dir, tmp_path):
    out, _ = latent_run
    cache = out/'latents'/'latents.safetensors'
    before = cache.stat().st_mtime_ns
    s = train(latent_cfg(out, ae_dir, 'optim.max_steps=6', 'output.resume=auto', 'output.checkpoint_every=2',
                         'output.sample_every=100'))
    assert s['steps'] == 6 and s['start_step'] == 4
    assert cache.stat().st_mtime_ns == before                      # read back, not encoded again
    other = tiny_autoencoder(tmp_path/'other', seed=3)
    with pytest.raises(ConfigError, match='model.autoencoder'):
        train(latent_cfg(out, other, 'optim.max_steps=8', 'output.resume=auto'))


def test_generator_draws_decoded_images_at_film_size(latent_run):
    out, _ = latent_run
    gen = load_generator(out, device='cpu')
    assert isinstance(gen, LatentDiffusionGenerator)
    assert (gen.kind, gen.image_size, gen.latent_size, gen.factor) == ('latent-diffusion', SIZE, 16, 4)
    mask = torch.zeros(SIZE, SIZE); mask[20:30, 36:44] = 1
    x = gen.generate(findings='mass', masks=mask, n=2, seed=[5, 6], steps=3)
    assert x.shape == (2, 1, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    again = gen.generate(findings='mass', masks=mask, n=2, seed=[5, 6], steps=3)
    assert torch.equal(x, again)
    with pytest.raises(Exception, match='masks'): gen.generate(findings='mass', masks=torch.zeros(16, 16), steps=2)
    p = gen.provenance()
    assert p['kind'] == 'latent-diffusion' and p['image_size'] == SIZE and len(p['autoencoder_sha256']) == 64
    assert '/' not in json.dumps({k: v for k, v in p.items() if k != 'package'}).replace('"/"', '')


def test_a_latent_checkpoint_is_not_opened_as_a_pixel_model(latent_run):
    from cxr_diffusion_nbs.sampling import PixelDiffusionGenerator, SamplingError
    with pytest.raises(SamplingError, match='latent-diffusion'): PixelDiffusionGenerator.load(latent_run[0], device='cpu')


def test_cxr_sample_writes_images_at_film_size(latent_run, tmp_path):
    from PIL import Image
    out = tmp_path/'samples'
    sample_main(['--checkpoint', str(latent_run[0]), '--finding', 'nodule', '--n', '2', '--steps', '3', '--output', str(out)])
    files = sorted(out.glob('sample_*.png'))
    assert len(files) == 2 and Image.open(files[0]).size == (SIZE, SIZE)
    prov = json.loads(Image.open(files[0]).text['Provenance'])
    assert prov['kind'] == 'latent-diffusion' and prov['synthetic'] == 1


def test_inpainting_through_a_latent_generator_keeps_the_outside_exact(latent_run):
    from cxr_diffusion_nbs.inpainting import insert_lesion, InpaintingError
    gen = load_generator(latent_run[0], device='cpu')
    ds = CXRDataset(load_shared_subset(find_data_root()), size=SIZE, split='val')
    image = ds[0]['image']
    mask = torch.zeros(1, SIZE, SIZE); mask[:, 24:34, 30:40] = 1
    r = insert_lesion(gen, None, image, mask, 'nodule', steps=4, jump_length=2, jump_n_sample=2, seed=1)
    assert r.images.shape == (1, 1, SIZE, SIZE)
    outside = r.region == 0
    assert torch.equal(r.images[outside], image[None].expand_as(r.images)[outside])   # the film's own pixels
    assert (r.images - image).abs()[r.region > 0].mean() > 0                             # regenerated inside
    with pytest.raises(InpaintingError, match='noise_scheduler'): insert_lesion(gen, gen.noise_scheduler, image, mask, 'nodule')
    with pytest.raises(InpaintingError, match="'image'"): insert_lesion(gen, None, image[:, :32, :32], mask, 'nodule')


def test_inpainting_through_a_pixel_generator_is_the_denoiser_call():
    from cxr_diffusion_nbs.inpainting import insert_lesion
    gen = load_generator(ROOT/'data'/'models'/'cpu64_demo', device='cpu')
    image = CXRDataset(load_shared_subset(find_data_root()), size=64, split='val')[0]['image']
    mask = torch.zeros(64, 64); mask[20:28, 30:38] = 1
    kw = dict(steps=3, jump_length=1, jump_n_sample=1, seed=2)
    assert torch.equal(insert_lesion(gen, None, image, mask, 'mass', **kw).images,
                       insert_lesion(gen.model, gen.noise_scheduler, image, mask, 'mass', **kw).images)


def test_ilvr_through_a_latent_generator_works_on_latents(latent_run):
    from cxr_diffusion_nbs.ilvr import ILVRReference, ILVRError, ilvr_sample
    gen = load_generator(latent_run[0], device='cpu')
    ref = CXRDataset(load_shared_subset(find_data_root()), size=SIZE, split='val')[1]['image']
    # factor = one latent cell, every step, full weight: the latents end as the reference's, so the image is its decode
    res = ilvr_sample(gen, None, ILVRReference(ref, factor=gen.factor, stop_t=0), n=1, steps=3, seed=0)
    assert res.images.shape == (1, 1, SIZE, SIZE)
    assert torch.allclose(res.images, gen.to_images(gen.to_latents(ref[None])), atol=1e-4)
    loose = ilvr_sample(gen, None, ILVRReference(ref, factor=16, stop_t=0), n=1, steps=3, seed=0).images
    assert not torch.allclose(loose, res.images, atol=1e-3)            # a coarser filter leaves the model room
    with pytest.raises(ILVRError, match='factor'): ilvr_sample(gen, None, ILVRReference(ref, factor=2), n=1, steps=2)
    with pytest.raises(ILVRError, match='noise_scheduler'): ilvr_sample(gen, gen.noise_scheduler, ILVRReference(ref), n=1)


DEMO = ROOT/'data'/'models'/'cpu256_latent_demo'


def test_shipped_latent_demo_opens_anywhere_and_samples_256_px(tmp_path):
    "The shipped latent demo: diffusers opens its autoencoder alone; `cxr-sample` writes 256-px images through it."
    from PIL import Image
    from diffusers import AutoencoderKL
    ae = AutoencoderKL.from_pretrained(DEMO, subfolder='vae')
    assert ae.config.in_channels == 1 and ae.config.shift_factor is not None and ae.config.scaling_factor != 1
    gen = load_generator(DEMO, device='cpu')
    assert (gen.kind, gen.image_size, gen.latent_size) == ('latent-diffusion', 256, 64)
    out = tmp_path/'samples'
    sample_main(['--checkpoint', str(DEMO), '--finding', 'nodule', '--n', '2', '--steps', '3', '--output', str(out)])
    files = sorted(out.glob('sample_*.png'))
    assert len(files) == 2 and {Image.open(f).size for f in files} == {(256, 256)}
