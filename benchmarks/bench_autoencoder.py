"""Does the autoencoder keep what a latent diffusion model needs? PSNR, SSIM and lesion-region SSIM on whole 256-px
validation films, and what a round trip costs.

It loads an autoencoder (default: the shipped `data/models/cpu256_latent_demo/vae`), encodes and decodes every film of
the validation split at 256 px (the split the trainers use, with the held-out test patients moved out), and prints,
with 95 % bootstrap intervals over films and the spread (SD):

* PSNR (data range 1 on [0, 1] films), target >= 35 dB;
* SSIM (scikit-image, data range 1, 7 x 7 window), target >= 0.92;
* lesion-region SSIM: the SSIM map averaged inside the lesion outlines, on the films that have any, target >= 0.90;
* encode + decode seconds per film (batch `--batch`, the torch threads shown),

then one line saying which targets are met. For reference it prints the same measures for the simplest
compressor (each 4 x 4 block to its mean, back by bilinear interpolation). Measured numbers, not a test.

    .venv/bin/python benchmarks/bench_autoencoder.py
    .venv/bin/python benchmarks/bench_autoencoder.py --model runs/vae256 --max-images 40
"""
import argparse, json, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cxr_diffusion_nbs.core import find_data_root, shareable_path
from cxr_diffusion_nbs.vae import (AUTOENCODER_TARGETS, autoencoder_folder, evaluate_autoencoder, latent_shape,
                                   load_autoencoder, metrics_summary, reconstruction_metrics, validation_dataset)

ROOT = Path(__file__).resolve().parents[1]


def baseline(ds, n: int, factor: int) -> pd.DataFrame:
    "The metrics of factor x factor block means upsampled bilinearly (a reference, not a model)."
    rows = []
    for i in range(n):
        it = ds[i]
        x = it['image'][None]
        r = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode='bilinear', align_corners=False)
        rows.append(reconstruction_metrics(x[0], r[0], it.get('mask')))
    return pd.DataFrame(rows)


def line(name: str, m: dict) -> str:
    return (f"{name:<18s} {m['psnr']:7.2f} [{m['psnr_ci'][0]:.2f}, {m['psnr_ci'][1]:.2f}] sd {m['psnr_sd']:.2f}   "
            f"{m['ssim']:.4f} [{m['ssim_ci'][0]:.4f}, {m['ssim_ci'][1]:.4f}] sd {m['ssim_sd']:.4f}   "
            f"{m['lesion_ssim']:.4f} [{m['lesion_ssim_ci'][0]:.4f}, {m['lesion_ssim_ci'][1]:.4f}] sd {m['lesion_ssim_sd']:.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=str(ROOT/'data'/'models'/'cpu256_latent_demo'),
                   help='autoencoder folder (or a folder holding it as vae/: a run, a checkpoint, a shipped model)')
    p.add_argument('--split', default='val')
    p.add_argument('--size', type=int, default=256)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--max-images', type=int, default=None)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    ae = load_autoencoder(a.model, device='cpu')
    ds = validation_dataset(None, a.split, a.size)
    n = len(ds) if a.max_images is None else min(len(ds), a.max_images)
    folder = autoencoder_folder(a.model)
    print(f"model: {shareable_path(folder)} | blocks {list(ae.config.block_out_channels)} x{ae.config.layers_per_block} | "
          f"latent {latent_shape(ae, a.size)} | {sum(q.numel() for q in ae.parameters()) / 1e6:.2f} M parameters | "
          f"torch threads {torch.get_num_threads()}")
    print(f"data: {find_data_root().name}, split {a.split!r}: {n} films at {a.size} px\n")
    t0 = time.perf_counter()
    df = evaluate_autoencoder(ae, ds, batch_size=a.batch, max_images=n)
    m = metrics_summary(df)
    mb = metrics_summary(baseline(ds, n, 2 ** (len(ae.config.block_out_channels) - 1)))
    print(f"{'':18s} {'PSNR dB [95% CI]':>30s}   {'SSIM [95% CI]':>30s}   {'lesion-region SSIM [95% CI]':>32s}")
    print(line('autoencoder', m))
    print(line('block means', mb))
    print(f"\nfilms: {m['n_images']} ({m['n_lesion_images']} with lesion outlines) | encode + decode "
          f"{m['seconds_per_image']:.3f} s per film (batch {a.batch}) | total {time.perf_counter() - t0:.0f} s")
    met = {k: m[k] >= t for k, t in AUTOENCODER_TARGETS.items()}
    parts = [f"{k} {m[k]:.4g} {'>=' if ok else '<'} {AUTOENCODER_TARGETS[k]:g} ({'met' if ok else 'MISSED'})" for k, ok in met.items()]
    print(f"targets: {'ALL MET' if all(met.values()) else 'NOT ALL MET'}: " + '; '.join(parts))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=shareable_path(folder), data=find_data_root().name, split=a.split,
                                                autoencoder=m, block_means=mb, targets_met=met), indent=1))


if __name__ == '__main__':
    main()
