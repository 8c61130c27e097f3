"""Evidence figure for the docs: real images per rare finding next to samples of a trained run.

Usage:  python tools/make_demo_figure.py data/models/cpu64_demo [--n 4] [--steps 50]
(or a run folder after `cxr-train --config configs/cpu64.yaml`: python tools/make_demo_figure.py runs/cpu64)
Samples are drawn by `sampling.sample` (DDIM, one seed per image: seed, seed+1, ...), the package's one sampling loop.
Writes nbs/images/cpu64_demo_samples.png and nbs/images/cpu64_demo.json (the run's summary facts), atomically.
"""
import argparse, json
from pathlib import Path
import matplotlib; matplotlib.use('Agg')
from cxr_diffusion_nbs.core import atomic_write, project_root
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.dataset import CXRDataset, condition_rows
from cxr_diffusion_nbs.training import load_for_sampling, grid_samples, sample_grid_figure

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('run'); ap.add_argument('--n', type=int, default=4); ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--seed', type=int, default=0); ap.add_argument('--name', default='cpu64_demo')
    a = ap.parse_args()
    run = Path(a.run)
    model, sched, cfg = load_for_sampling(run, device='cpu')
    run = run if (run/'summary.json').exists() else run.parent    # a checkpoint folder: its run's summary
    d = cfg.data
    man = load_shared_subset(d.root) if d.root else load_shared_subset()
    mk = lambda split: CXRDataset(man, findings=d.findings, size=d.image_size, split=split, mask_mode=d.mask_mode)
    items, titles = condition_rows(mk(d.val_split), d.findings, fallback_ds=mk(d.split))
    x = grid_samples(model, sched, items, a.n, model.cond_cfg, steps=a.steps, seed=a.seed, device='cpu')
    summary = json.loads((run/'summary.json').read_text())
    o, m = cfg.optim, cfg.model
    facts = dict(config=dict(preset=m.preset, overrides=m.overrides, lr=o.lr, batch_size=o.batch_size, ema_decay=o.ema_decay,
                             loss=cfg.loss, conditioning=cfg.conditioning, mask_mode=d.mask_mode, augment=d.augment),
                 steps=summary['steps'],
                 images_seen=summary['images_seen'], epochs=summary['epoch'],
                 elapsed_min=round(summary['elapsed_s'] / 60, 1), images_per_s=summary.get('images_per_s'),
                 mixed_precision=summary.get('mixed_precision'), final_loss=summary.get('final_loss'),
                 train_images=len(mk(d.split)), image_size=d.image_size, sampler=f'sampling.sample: DDIM {a.steps} steps (trailing spacing), seeds {a.seed}..{a.seed + len(items) * a.n - 1} (one per image), EMA weights, no guidance',
                 conditions=f"labels + {d.mask_mode} lesion mask of the real image in the first column")
    fig = sample_grid_figure(x, items, titles, a.n, title=f"cpu64 demo: {facts['steps']} steps, {facts['images_seen']} images seen, "
                             f"{facts['elapsed_min']} CPU-min")
    out = project_root()/'nbs'/'images'
    with atomic_write(out/f'{a.name}_samples.png') as tmp: fig.savefig(tmp, dpi=72, format='png')
    with atomic_write(out/f'{a.name}.json') as tmp: tmp.write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))

if __name__ == '__main__': main()
