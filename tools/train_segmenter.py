"""Train the lesion segmenter shipped in data/models/segmenter64 (the judge of mask adherence in 17_adherence):
a small U-Net on the real training split of the shared NIH subset at 64 px, target = union of the lesion annotations
(ChestX-Det outlines, NIH boxes) of the 5 rare findings, plus true negatives. Writes its validation Dice too.

    .venv/bin/python tools/train_segmenter.py [--data ../shared/data/nih_cxr14_subset] [--epochs 40] [--out data/models/segmenter64]
    .venv/bin/python tools/train_segmenter.py --size 128 --levels 5 --width 8 --low-res 64 --test-fraction 0.25 --out data/models/segmenter128

The second is the 128-px judge of mask adherence: the study's test patients held out, and trained on 64-px round trips
as well, so it can judge a 64-px generator; its validation Dice is written both on native films and at 64 px.
"""
import argparse, time
from pathlib import Path
import numpy as np
import torch
from cxr_diffusion_nbs.adherence import (SegmenterConfig, train_segmenter, save_segmenter, load_segmenter,
                                         select_training_images, load_masked_images, mask_adherence)
from cxr_diffusion_nbs.core import find_data_root
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.classifier import round_trip
from cxr_diffusion_nbs.splits import with_held_out_test

ROOT = Path(__file__).resolve().parents[1]

def evaluate(model, real, cfg, split='val', low_res=None) -> dict:
    "Dice on the split's lesion images, false-positive area on its negatives, per finding Dice (of films brought to `low_res` and back if given)."
    sel = select_training_images(real, cfg.findings, split, negatives=1.0, seed=cfg.seed)
    sel = sel[sel.role.isin(['lesion', 'negative'])]
    d = load_masked_images(real, split, cfg.findings, cfg.image_size, image_ids=list(sel.image_id))
    images = d['images'] if low_res is None else round_trip(d['images'], low_res)
    df = mask_adherence(model, images, d['masks'], image_ids=d['image_ids']).assign(role=list(sel.role))
    les, neg = df[df.role == 'lesion'], df[df.role == 'negative']
    per = {f: round(float(les[d['labels'][(df.role == 'lesion').to_numpy(), k] == 1].dice.mean()), 3)
           for k, f in enumerate(cfg.findings)}
    return dict(val_lesion_images=len(les), val_dice=round(float(les.dice.mean()), 3), val_iou=round(float(les.iou.mean()), 3),
                val_dice_per_finding=per, val_negative_images=len(neg),
                val_negative_pred_area=round(float(neg.pred_area.mean()), 4),
                val_negative_clean=round(float((neg.pred_area == 0).mean()), 3))

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=None, help='default: the shared subset if present, else the bundled sample')
    p.add_argument('--epochs', type=int, default=40)
    p.add_argument('--width', type=int, default=12)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--levels', type=int, default=4)
    p.add_argument('--low-res', type=int, default=None, help='also train on images brought to this size and back')
    p.add_argument('--test-fraction', type=float, default=0.0, help="hold this share of training patients out ('test')")
    p.add_argument('--out', default=str(ROOT/'data'/'models'/'segmenter64'))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    real = with_held_out_test(load_shared_subset(a.data) if a.data else load_shared_subset(find_data_root()), a.test_fraction)
    cfg = SegmenterConfig(epochs=a.epochs, width=a.width, image_size=a.size, levels=a.levels, low_res=a.low_res, device='cpu')
    t0 = time.time()
    model, hist = train_segmenter(real, cfg, progress=True)
    secs = time.time() - t0
    print(hist.to_string(index=False))
    sel = select_training_images(real, cfg.findings, 'train', cfg.negatives, cfg.seed)
    facts = dict(data=real.name, train_lesion_images=int((sel.role == 'lesion').sum()),
                 train_negative_images=int((sel.role == 'negative').sum()),
                 train_excluded_images=int((sel.role == 'excluded').sum()), epochs=a.epochs,
                 train_seconds=round(secs, 1), final_loss=round(float(hist.loss.iloc[-1]), 4),
                 parameters=sum(q.numel() for q in model.parameters()), test_fraction=a.test_fraction,
                 made_by='tools/train_segmenter.py')
    save_segmenter(model, cfg, a.out, **facts)                  # float16 weights
    model, _ = load_segmenter(a.out, 'cpu')                     # evaluate what is shipped (float16-rounded)
    ev = evaluate(model, real, cfg)
    if cfg.low_res:
        ev.update({f'{k}_at_{cfg.low_res}px': v for k, v in evaluate(model, real, cfg, low_res=cfg.low_res).items()
                   if k.startswith('val_dice') or k.startswith('val_iou')})
    print(ev)
    save_segmenter(model, cfg, a.out, **facts, **ev)
    print('saved', a.out)

if __name__ == '__main__':
    main()
