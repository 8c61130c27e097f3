"""The measurements behind `configs/vae256.yaml` (shown in `nbs/09b_vae.ipynb`, stored in `nbs/images/vae_trials.csv`).

Two kinds of trial, each a set of `--set`-style overrides of `configs/vae256.yaml`:

* `throughput`: crops/s of the trainer's own step (`vae.ae_train_step`: crops, encode, posterior sample, decode, L1 +
  SSIM + KL, Adam, schedule) after two warm-up steps, for every candidate network / crop / batch / precision;
* `train NAME`: a short run of one trial at a fixed wall-clock budget (its cosine schedule sized to the budget from
  the measured throughput), then PSNR, SSIM and lesion-region SSIM on whole 256-px validation films (all of them,
  `evaluate NAME` again for a finished run).

Run them one at a time with the CPU lock held (they are heavy), e.g.

    flock /work/issue10/cpu.lock .venv/bin/python tools/vae_trials.py throughput
    flock /work/issue10/cpu.lock .venv/bin/python tools/vae_trials.py train base --minutes 8
"""
import argparse, json, shutil, sys, time
from pathlib import Path

import pandas as pd
import torch

from cxr_diffusion_nbs.dataset import crop_training_manifest
from cxr_diffusion_nbs.vae import (ae_train_step, build_ae_run, evaluate_autoencoder, load_autoencoder, load_vae_config,
                                   metrics_summary, train_autoencoder, validation_dataset)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT/'configs'/'vae256.yaml'
OUT = ROOT/'nbs'/'images'/'vae_trials.csv'

# name -> (what it is, overrides of configs/vae256.yaml)
TRIALS = {
    'base':       ('widths 32-64-64, 1 block/level, 64-px crops x 16, bf16', []),
    'fp32':       ('base in float32', ['optim.mixed_precision=no']),
    'w16':        ('widths 16-32-64', ['model.overrides.block_out_channels=[16, 32, 64]', 'model.overrides.norm_num_groups=8']),
    'w32-32-64':  ('widths 32-32-64', ['model.overrides.block_out_channels=[32, 32, 64]']),
    'w24':        ('widths 24-48-48', ['model.overrides.block_out_channels=[24, 48, 48]', 'model.overrides.norm_num_groups=8']),
    'w32-128':    ('widths 32-64-128 (the earlier attempt)', ['model.overrides.block_out_channels=[32, 64, 128]']),
    'w64':        ('widths 64-64-64', ['model.overrides.block_out_channels=[64, 64, 64]']),
    'lpb2':       ('base, 2 blocks/level', ['model.overrides.layers_per_block=2']),
    'crop48x32':  ('base, 48-px crops x 32', ['data.crop_size=48', 'optim.batch_size=32']),
    'crop96x8':   ('base, 96-px crops x 8', ['data.crop_size=96', 'optim.batch_size=8']),
    'attn':       ('base + self-attention in the middle blocks', ['model.overrides.mid_block_add_attention=true']),
    'disc':       ('base + patch discriminator from half-way (weight 0.05)', ['loss.disc_weight=0.05']),
    'f8':         ('factor 8: widths 32-64-64-64', ['model.preset=cpu_f8']),
}


def row_of(name: str, cfg, **kw) -> dict:
    net = cfg.autoencoder_config()
    return dict(trial=name, what=TRIALS[name][0], widths='-'.join(map(str, net.block_out_channels)),
                blocks=net.layers_per_block, factor=net.factor, attention=net.mid_block_add_attention,
                discriminator=cfg.loss.disc_weight > 0, crop=cfg.data.crop_size, batch=cfg.optim.batch_size,
                precision=cfg.optim.mixed_precision, **kw)


def record(row: dict):
    df = pd.read_csv(OUT) if OUT.exists() else pd.DataFrame()
    if len(df):
        same = (df['trial'] == row['trial']) & (df['kind'] == row['kind'])
        if row['kind'] == 'training': same &= df['budget_min'] == row['budget_min']
        df = df[~same]
    df = pd.concat([df, pd.DataFrame([row])], ignore_index=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT, index=False)
    print(json.dumps(row), flush=True)


def throughput(name: str, steps: int) -> float:
    "Crops/s of the trainer's step for trial `name` (32 training films in memory; the step does not depend on how many)."
    cfg = load_vae_config(CONFIG, TRIALS[name][1] + ['data.limit=32', 'output.progress=false', 'output.output_dir=/tmp/vae-throughput'])
    run = build_ae_run(cfg, None, crop_training_manifest(cfg))
    if run.disc is not None: cfg.loss.disc_start = 0        # time the step with the discriminator on
    for _ in range(2): ae_train_step(run)
    t0 = time.perf_counter()
    for _ in range(steps): ae_train_step(run)
    cps = steps * cfg.optim.batch_size / (time.perf_counter() - t0)
    record(row_of(name, cfg, kind='throughput', crops_per_s=round(cps, 2), mixed_precision=run.mixed_precision,
                  threads=torch.get_num_threads(), parameters=sum(p.numel() for p in run.ae.parameters())))
    return cps


def train_trial(name: str, minutes: float, eval_images: int):
    "A short run of trial `name` with a `minutes` budget, evaluated on `eval_images` whole validation films."
    base = load_vae_config(CONFIG, TRIALS[name][1])
    df = pd.read_csv(OUT) if OUT.exists() else pd.DataFrame(columns=['trial', 'kind'])
    tp = df[(df['trial'] == name) & (df['kind'] == 'throughput')]
    cps = float(tp['crops_per_s'].iloc[-1]) if len(tp) else throughput(name, 6)
    steps = int(0.93 * cps / base.optim.batch_size * minutes * 60)   # 7 % below the steady rate: the schedule ends before the cap
    out = ROOT/'runs'/'vae_trials'/f'{name}-{minutes:g}min'
    if out.exists(): shutil.rmtree(out)
    ov = TRIALS[name][1] + [f'optim.max_steps={steps}', f'optim.max_minutes={minutes}', f'output.output_dir={out}',
                            'output.final_eval=false', 'output.stats_images=32', 'output.checkpoint_every=null',
                            'output.log_every=50']
    if base.loss.disc_weight > 0: ov.append(f'loss.disc_start={steps // 2}')
    train_autoencoder(CONFIG, ov)
    evaluate_trial(name, minutes, eval_images)


def evaluate_trial(name: str, minutes: float, eval_images):
    "PSNR, SSIM and lesion-region SSIM of trial `name`'s finished run on whole validation films (all if `eval_images` is None)."
    out = ROOT/'runs'/'vae_trials'/f'{name}-{minutes:g}min'
    s = json.loads((out/'summary.json').read_text())
    cfg = load_vae_config(s['config'])
    val = validation_dataset(None, cfg.data.val_split, cfg.data.image_size, cfg.data.test_fraction)
    m = metrics_summary(evaluate_autoencoder(load_autoencoder(out/'vae', device='cpu'), val, max_images=eval_images), n_boot=500)
    record(row_of(name, cfg, kind='training', budget_min=minutes, crops_per_s=s['crops_per_s'], steps=s['steps'], minutes=s['train_minutes'],
                  crops_seen=s['crops_seen'], psnr=round(m['psnr'], 3), ssim=round(m['ssim'], 4),
                  lesion_ssim=round(m['lesion_ssim'], 4), n_images=m['n_images'], n_lesion_images=m['n_lesion_images']))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=['throughput', 'train', 'evaluate'])
    p.add_argument('names', nargs='*', help=f'trials (default: all for throughput); known: {list(TRIALS)}')
    p.add_argument('--steps', type=int, default=8, help='timed steps per throughput trial')
    p.add_argument('--minutes', type=float, default=8.0, help='training budget per training trial')
    p.add_argument('--eval-images', type=int, default=None, help='validation films evaluated (default: all)')
    a = p.parse_args()
    names = a.names or (list(TRIALS) if a.what == 'throughput' else [])
    for n in names:
        if n not in TRIALS: sys.exit(f'unknown trial {n!r}; known: {list(TRIALS)}')
    for n in names:
        if a.what == 'throughput': throughput(n, a.steps)
        elif a.what == 'train': train_trial(n, a.minutes, a.eval_images)
        else: evaluate_trial(n, a.minutes, a.eval_images)


if __name__ == '__main__':
    main()
