"""ILVR on a latent generator: does the low-pass on latents hand over the reference's coarse *pixels*, and what would
the pixel-space form cost per step?

On the shipped latent demo (or --checkpoint), for K validation films used as references (each conditioned on its
own labels and lesion mask, one seed per film), it measures in pixel space, on the decoded 256-px images:
  - lowpass_correlation(x, reference, N): Pearson correlation of phi_N(x) with phi_N(reference), for
    plain conditional draws (no reference: the floor), latent ILVR with filter N (stop step 0), and the reference's own
    autoencoder round trip D(E(y)) (the ceiling any latent model can reach);
  - seconds per image of the plain draw and of latent ILVR (DDIM, --steps);
  - what the pixel-space form would add at every step: one decode and one encode per image (measured here on the same
    films), against one denoiser step (the plain draw's time divided by its steps).
Measured numbers, not a test; `--record` writes them as a CSV (the table of nbs/13_ilvr.ipynb).

    .venv/bin/python benchmarks/bench_ilvr_latent.py --record nbs/images/ilvr_latent.csv      # ~3 CPU minutes
"""
import argparse, time
from pathlib import Path

import pandas as pd
import torch

from cxr_diffusion_nbs.core import atomic_write, find_data_root, shareable_path
from cxr_diffusion_nbs.dataset import CXRDataset
from cxr_diffusion_nbs.ilvr import ILVRReference, ilvr_sample, lowpass_correlation
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.sampling import load_generator, sample
from cxr_diffusion_nbs.splits import with_held_out_test
from cxr_diffusion_nbs.vae import decode, encode

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT/'data'/'models'/'cpu256_latent_demo'


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', default=str(DEMO))
    p.add_argument('--films', type=int, default=8, help='validation films used as references')
    p.add_argument('--factors', default='8,16,32', help='ILVR filter factors N (pixels; multiples of the autoencoder factor)')
    p.add_argument('--steps', type=int, default=25)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--record', help='write the table to this CSV')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    gen = load_generator(a.checkpoint, device='cpu')
    if not gen.has_latents: raise SystemExit(f'{a.checkpoint}: a {gen.kind} generator; this benchmark measures latent ones')
    man = with_held_out_test(load_shared_subset(find_data_root()), .25)
    ds = CXRDataset(man, findings=gen.findings, size=gen.image_size, split='val', mask_mode=gen.mask_mode)
    items = [ds[i] for i in range(min(a.films, len(ds)))]
    y = torch.stack([it['image'] for it in items])
    conds = gen.inputs(labels=torch.stack([it['labels'] for it in items]), masks=torch.stack([it['mask'] for it in items]))
    K, factors = len(items), [int(f) for f in a.factors.split(',')]
    opts = dict(sampler='ddim', steps=a.steps, seed=a.seed)
    t0 = time.perf_counter(); plain = gen.to_images(sample(gen.model, gen.noise_scheduler, conds, n=K, **opts).images)
    plain_s = (time.perf_counter() - t0) / K
    t0 = time.perf_counter(); z = encode(gen.autoencoder, y); enc_s = (time.perf_counter() - t0) / K
    t0 = time.perf_counter(); rt = decode(gen.autoencoder, z); dec_s = (time.perf_counter() - t0) / K
    rows = []
    for N in factors:
        t0 = time.perf_counter()
        x = ilvr_sample(gen, None, ILVRReference(y, N, 0, name=f'N={N}'), conds=conds, n=K, **opts).images
        ilvr_s = (time.perf_counter() - t0) / K
        for what, imgs, secs in (('plain conditional draw', plain, plain_s), ('latent ILVR', x, ilvr_s), ('round trip D(E(y))', rt, None)):
            c = lowpass_correlation(imgs, y, N)                     # image k against its own reference k
            rows.append(dict(factor=N, what=what, films=K, lowpass_corr_mean=round(float(c.mean()), 4), lowpass_corr_min=round(float(c.min()), 4),
                             seconds_per_image=None if secs is None else round(secs, 3)))
    t = pd.DataFrame(rows)
    step_s = plain_s / a.steps
    print(f'{shareable_path(a.checkpoint)}: {K} validation films as references, DDIM {a.steps} steps, threads {torch.get_num_threads()}')
    print(t.to_string(index=False))
    print(f'per image and step: denoiser step {step_s:.3f} s; decode {dec_s:.3f} s + encode {enc_s:.3f} s, what the pixel-space '
          f'form would add at every step ({(dec_s + enc_s) / step_s:.1f}x a denoiser step; ILVR at {a.steps} steps '
          f'{(a.steps * (dec_s + enc_s) + plain_s) / plain_s:.1f}x the plain draw)')
    if a.record:
        t = t.assign(steps=a.steps, denoiser_step_s=round(step_s, 4), decode_s=round(dec_s, 4), encode_s=round(enc_s, 4))
        with atomic_write(Path(a.record)) as tmp: t.to_csv(tmp, index=False)
        print('wrote', a.record)


if __name__ == '__main__': main()
