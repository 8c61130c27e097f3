"""What does latent diffusion save at 256 px? Seconds per image to train and to sample, measured on a few steps here.

Three denoisers with the same U-Net widths (the `cpu64` preset: 32/64/128 channels, attention at the 1/4 level):
  - latent 256 px: on the 4 x 64 x 64 latents of the 1-channel autoencoder (configs/cpu256_latent.yaml); training
    reads cached latents, sampling adds one decode per image; encoding the training set once is reported apart;
  - pixel 256 px: the same U-Net on 256-px films (1 channel; its attention scaled to the same level, 64 px);
  - pixel 64 px: the shipped 64-px demo's network (configs/cpu64.yaml).
Training: forward + backward + AdamW on a batch of real films (or their latents) with the configs' precision.
Sampling: DPM-Solver++ 20 steps, unguided, batch 8. Weights are freshly initialised (costs do not depend on them).
Measured numbers, not extrapolated; the machine may be shared, so each figure is the median of repeated timings.

    .venv/bin/python benchmarks/bench_latent.py                     # ~5 CPU minutes
    .venv/bin/python benchmarks/bench_latent.py --train-steps 2 --repeats 1
"""
import argparse, statistics, time
from pathlib import Path

import torch

from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, batch_conditions
from cxr_diffusion_nbs.core import find_data_root
from cxr_diffusion_nbs.dataset import CXRDataset
from cxr_diffusion_nbs.latents import LatentDataset
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.sampling import sample
from cxr_diffusion_nbs.training import conditioning_config, load_config, resolve_mixed_precision, run_autoencoder, unet_config
from cxr_diffusion_nbs.unet import make_noise_scheduler
from cxr_diffusion_nbs.vae import decode, encode

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    "Median wall seconds of `fn()` over `repeats` calls (after one warm-up call)."
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def arm(cfg, batch_size: int, train_steps: int, sample_n: int, repeats: int, autoencoder=None) -> dict:
    "Seconds per image to train (one step = batch_size images) and to sample (DPM-Solver++ 20) for `cfg`'s network."
    torch.manual_seed(0)
    d = cfg.data
    ucfg, ccfg = unet_config(cfg), conditioning_config(cfg)
    model = ConditionalDenoiser(ucfg, ccfg).train()
    sched = make_noise_scheduler(ucfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    man = load_shared_subset(Path(d.root) if d.root else find_data_root())
    ds = (LatentDataset(man, autoencoder, size=d.image_size, split='train', mask_mode=d.mask_mode) if autoencoder is not None
          else CXRDataset(man, findings=d.findings, size=d.image_size, split='train', mask_mode=d.mask_mode))
    batch = torch.utils.data.default_collate([ds[i] for i in range(batch_size)])
    conds = batch_conditions(batch, ccfg)
    x0 = batch['image']
    bf16 = resolve_mixed_precision(cfg.optim.mixed_precision, 'cpu') == 'bf16'

    def train_steps_():
        for _ in range(train_steps):
            noise, t = torch.randn_like(x0), torch.randint(0, sched.config.num_train_timesteps, (len(x0),))
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                pred = model(sched.add_noise(x0, noise, t), t, **conds)
            loss = torch.nn.functional.mse_loss(pred.float(), sched.get_velocity(x0, noise, t))
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    train_s = timed(train_steps_, repeats) / (train_steps * batch_size)
    model.eval()
    few = {k: v[:sample_n] for k, v in conds.items()}

    def draw():
        z = sample(model, sched, few, n=sample_n, sampler='dpmpp', steps=20, mixed_precision='bf16' if bf16 else 'no').images
        return decode(autoencoder, z) if autoencoder is not None else z

    sample_s = timed(draw, repeats) / sample_n
    out = dict(image_px=d.image_size, unet_px=ucfg.image_size, channels=ucfg.in_channels, params=sum(q.numel() for q in model.parameters()),
               train_s_per_image=train_s, sample_s_per_image=sample_s)
    if autoencoder is not None:
        films = torch.stack([ds.pixel_item(i)['image'] for i in range(batch_size)])
        out['encode_s_per_image'] = timed(lambda: encode(autoencoder, films), repeats) / batch_size
        out['decode_s_per_image'] = timed(lambda: decode(autoencoder, encode(autoencoder, films[:sample_n])), repeats) / sample_n - out['encode_s_per_image']
    return out


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--latent-config', default=str(ROOT/'configs'/'cpu256_latent.yaml'))
    p.add_argument('--autoencoder', help="an autoencoder folder instead of the config's model.autoencoder")
    p.add_argument('--pixel64-config', default=str(ROOT/'configs'/'cpu64.yaml'))
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--train-steps', type=int, default=3, help='training steps per timing')
    p.add_argument('--sample-n', type=int, default=8)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=None)
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    lat = load_config(a.latent_config, [('model.autoencoder', a.autoencoder)] if a.autoencoder else [])
    ae = run_autoencoder(lat)
    # the pixel-space twin at 256 px: the same preset (widths), attention at the same level (1/4 of the input)
    pix256 = load_config(a.latent_config, [('model.autoencoder', None), ('data.image_size', lat.data.image_size),
                                           ('loss.ssim_weight', 0.0)])
    pix64 = load_config(a.pixel64_config)
    print(f"threads={torch.get_num_threads()} batch={a.batch_size} train_steps={a.train_steps} sample_n={a.sample_n} "
          f"repeats={a.repeats} precision={lat.optim.mixed_precision}")
    rows = {'latent 256 px': arm(lat, a.batch_size, a.train_steps, a.sample_n, a.repeats, autoencoder=ae),
            'pixel 256 px': arm(pix256, a.batch_size, a.train_steps, a.sample_n, a.repeats),
            'pixel 64 px': arm(pix64, a.batch_size, a.train_steps, a.sample_n, a.repeats)}
    print(f"{'':15s} {'U-Net input':>14s} {'params':>9s} {'train s/img':>12s} {'sample s/img':>13s}")
    for name, r in rows.items():
        print(f"{name:15s} {r['channels']:>3d} x {r['unet_px']:>3d} px  {r['params'] / 1e6:8.2f}M {r['train_s_per_image']:12.4f} {r['sample_s_per_image']:13.4f}")
    L, P, S = rows['latent 256 px'], rows['pixel 256 px'], rows['pixel 64 px']
    print(f"autoencoder: encode {L['encode_s_per_image']:.4f} s/img (once per training film and variant), decode {L['decode_s_per_image']:.4f} s/img (in the sampling figure above)")
    print(f"summary: at 256 px the latent model trains {P['train_s_per_image'] / L['train_s_per_image']:.1f}x and samples "
          f"{P['sample_s_per_image'] / L['sample_s_per_image']:.1f}x faster than the pixel-space U-Net of the same widths; "
          f"against the 64-px pixel demo it costs {L['train_s_per_image'] / S['train_s_per_image']:.2f}x to train and "
          f"{L['sample_s_per_image'] / S['sample_s_per_image']:.2f}x to sample per image")
