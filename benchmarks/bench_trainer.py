"""How much does the trainer cost on top of the bare training step?

Prints the trainer's images/s (from its CSV log: data loading + augmentation, condition dropout, lesion-preserving
loss, gradient clipping, LR schedule, EMA, logging; sample grids and checkpoints excluded) next to a bare loop
(U-Net forward + backward + AdamW step on the same model, the same real batch, the same precision) and their ratio.
Target: the trainer costs <= 10% more. Measured numbers, not a test.

    .venv/bin/python benchmarks/bench_trainer.py                       # configs/cpu64.yaml, 20 timed steps
    .venv/bin/python benchmarks/bench_trainer.py --config configs/tiny.yaml --steps 50
"""
import argparse, statistics, tempfile, time
from pathlib import Path

import torch

from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, batch_conditions
from cxr_diffusion_nbs.core import find_data_root
from cxr_diffusion_nbs.dataset import CXRDataset
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.training import (conditioning_config, load_config, read_log, resolve_mixed_precision, train,
                                        unet_config)
from cxr_diffusion_nbs.unet import make_noise_scheduler

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(cfg, steps: int, warmup: int = 3) -> float:
    "images/s of forward + backward + AdamW step, nothing else, on one real batch."
    torch.manual_seed(cfg.optim.seed)
    d, o = cfg.data, cfg.optim
    ucfg, ccfg = unet_config(cfg), conditioning_config(cfg)
    model = ConditionalDenoiser(ucfg, ccfg).train()
    sched = make_noise_scheduler(ucfg)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    ds = CXRDataset(load_shared_subset(Path(d.root) if d.root else find_data_root()), findings=d.findings,
                    size=d.image_size, split=d.split, mask_mode=d.mask_mode)
    batch = torch.utils.data.default_collate([ds[i] for i in range(o.batch_size)])
    conds = batch_conditions(batch, ccfg)
    x0 = batch['image']
    noise, t = torch.randn_like(x0), torch.randint(0, sched.config.num_train_timesteps, (len(x0),))
    x_t, target = sched.add_noise(x0, noise, t), sched.get_velocity(x0, noise, t)
    bf16 = resolve_mixed_precision(o.mixed_precision, 'cpu') == 'bf16'
    for i in range(warmup + steps):
        if i == warmup: t0 = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            pred = model(x_t, t, **conds)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return steps * o.batch_size / (time.perf_counter() - t0)


def trainer(cfg, steps: int, warmup: int = 3) -> tuple:
    "images/s of `train()` from its per-step CSV rows (median over the timed steps), and the run summary."
    with tempfile.TemporaryDirectory() as out:
        # a small training set, cached after the first epoch: measures the steady state, not the first PNG decode
        run = load_config(cfg, [('output.output_dir', out), ('optim.max_steps', warmup + steps),
                                 ('output.log_every', 1), ('output.sample_every', None),
                                 ('output.checkpoint_every', None), ('output.progress', False),
                                 ('data.limit', cfg.optim.batch_size * 2)])
        summary = train(run)
        ips = read_log(Path(out)/'log.csv')['images_per_s'].iloc[warmup:]
        return statistics.median(ips), summary


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default=str(ROOT/'configs'/'cpu64.yaml'))
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='config overrides')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    cfg = load_config(a.config, a.set)
    print(f"config {a.config}: preset={cfg.model.preset} {cfg.data.image_size}px batch={cfg.optim.batch_size} "
          f"mixed_precision={cfg.optim.mixed_precision} threads={torch.get_num_threads()} steps={a.steps}")
    b1 = bare_loop(cfg, a.steps)
    tr, s = trainer(cfg, a.steps)
    b2 = bare_loop(cfg, a.steps)     # again: the machine may be shared, bracket the trainer
    bare = (b1 + b2) / 2
    print(f"bare loop   : {b1:8.1f} / {b2:8.1f} images/s (before / after)")
    print(f"trainer     : {tr:8.1f} images/s  (median per-step, {s['mixed_precision']}, {s['device']})")
    print(f"ratio       : trainer costs {100 * (bare / tr - 1):+.1f}% time per image vs the bare loop (target <= +10%)")
