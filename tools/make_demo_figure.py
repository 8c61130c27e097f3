"""Evidence figure for the docs: real images per rare finding next to samples of a trained model.

Usage:  python tools/make_demo_figure.py data/models/cpu64_demo [--n 4] [--steps 50]
        python tools/make_demo_figure.py data/models/cpu256_latent_demo --name cpu256_latent_demo
(or a run folder after `cxr-train --config configs/cpu64.yaml`: python tools/make_demo_figure.py runs/cpu64)
Samples are drawn through `load_generator(...).generate` (pixel or latent model alike: the package's one sampling
loop), DDIM, one seed per image (seed, seed+1, ...), EMA weights, no guidance, conditioned on the labels and the lesion
mask of the real image shown first in each row. Writes nbs/images/<name>_samples.png and nbs/images/<name>.json (the
run's summary facts, and for a latent model its autoencoder's), atomically.
"""
import argparse, json, time
from pathlib import Path
import matplotlib; matplotlib.use('Agg')
import torch
import yaml
from cxr_diffusion_nbs.core import atomic_write, project_root, resolve_path
from cxr_diffusion_nbs.checkpoints import AUTOENCODER_FOLDER, checkpoint_folder, list_checkpoints
from cxr_diffusion_nbs.dataset import CXRDataset, condition_rows
from cxr_diffusion_nbs.sampling import load_generator
from cxr_diffusion_nbs.training import load_config, sample_grid_figure, training_manifest


def autoencoder_facts(ck: Path) -> dict | None:
    f = ck/AUTOENCODER_FOLDER/'training.json'
    if not f.exists(): return None
    t = json.loads(f.read_text())
    v = t.get('validation', {})
    return dict(network=t['network']['block_out_channels'], mid_block_attention=t['network'].get('mid_block_add_attention'),
                factor=t['factor'], latent_shape=t['latent_shape'], parameters=t['parameters'], steps=t['steps'],
                crop_size=t['crop_size'], crops_seen=t['crops_seen'], train_minutes=t['train_minutes'],
                psnr=round(v.get('psnr', float('nan')), 2), ssim=round(v.get('ssim', float('nan')), 4),
                lesion_ssim=round(v.get('lesion_ssim', float('nan')), 4), validation_images=v.get('n_images'))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('run'); ap.add_argument('--n', type=int, default=4); ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--seed', type=int, default=0); ap.add_argument('--name', default='cpu64_demo')
    a = ap.parse_args()
    run = resolve_path(a.run)
    ck = checkpoint_folder(list_checkpoints(run)[-1] if list_checkpoints(run) else run)
    run_dir = ck if (ck/'summary.json').exists() else ck.parent      # a checkpoint folder: its run's summary
    cfg = load_config(yaml.safe_load((ck/'config.yaml').read_text()), check_inputs=False)
    gen = load_generator(ck, device='cpu')
    d = cfg.data
    man = training_manifest(cfg)                                   # the held-out test patients removed, as in training
    mk = lambda split: CXRDataset(man, findings=d.findings, size=d.image_size, split=split, mask_mode=d.mask_mode)
    items, titles = condition_rows(mk(d.val_split), d.findings, fallback_ds=mk(d.split))
    rows = [it for it in items for _ in range(a.n)]
    t0 = time.time()
    x = gen.generate(labels=torch.stack([it['labels'] for it in rows]), masks=torch.stack([it['mask'] for it in rows]),
                     seed=a.seed, sampler='ddim', steps=a.steps, guidance={})
    sample_s = time.time() - t0
    summary = json.loads((run_dir/'summary.json').read_text())
    o, m = cfg.optim, cfg.model
    facts = dict(config=dict(preset=m.preset, overrides=m.overrides, lr=o.lr, batch_size=o.batch_size, ema_decay=o.ema_decay,
                             loss=cfg.loss, conditioning=cfg.conditioning, mask_mode=d.mask_mode, augment=d.augment),
                 kind=gen.kind, steps=summary['steps'],
                 images_seen=summary['images_seen'], epochs=summary['epoch'],
                 elapsed_min=round(summary['elapsed_s'] / 60, 1), images_per_s=summary.get('images_per_s'),
                 mixed_precision=summary.get('mixed_precision'), final_loss=summary.get('final_loss'),
                 train_images=len(mk(d.split)), image_size=gen.image_size,
                 sampler=f'load_generator(...).generate: DDIM {a.steps} steps (trailing spacing), seeds {a.seed}..{a.seed + len(rows) - 1} (one per image), EMA weights, no guidance',
                 sample_seconds_per_image=round(sample_s / len(rows), 2),
                 conditions=f"labels + {d.mask_mode} lesion mask of the real image in the first column")
    ae = autoencoder_facts(ck)
    if ae: facts.update(autoencoder=ae, latent_size=gen.latent_size)
    what = f'{a.name.replace("_", " ")} ({gen.image_size} px{", latent" if ae else ""})'
    cost = f"{facts['elapsed_min']} CPU-min" + (f" (+ autoencoder {ae['train_minutes']:.0f})" if ae else '')
    fig = sample_grid_figure(x, items, titles, a.n, title=f"{what}\n{facts['steps']:,} steps, {facts['images_seen']:,} images seen, {cost}")
    out = project_root()/'nbs'/'images'
    with atomic_write(out/f'{a.name}_samples.png') as tmp: fig.savefig(tmp, dpi=72 if gen.image_size <= 64 else 100, format='png')
    with atomic_write(out/f'{a.name}.json') as tmp: tmp.write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))


if __name__ == '__main__': main()
