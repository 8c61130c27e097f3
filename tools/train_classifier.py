"""Train a shipped classifier on the shared NIH subset's training split, 5 rare findings:
data/models/classifier64 (the domain feature extractor and class-consistency judge of the evaluation notebooks) and
data/models/classifier128 (the 128-px judge of conditioning fidelity, trained with the study's test patients held out
and on 64-px round trips as well, so it can judge a 64-px generator).

    .venv/bin/python tools/train_classifier.py [--data ../shared/data/nih_cxr14_subset] [--epochs 12] [--out data/models/classifier64]
    .venv/bin/python tools/train_classifier.py --size 128 --stem 2 --low-res 64 --test-fraction 0.25 --out data/models/classifier128
"""
import argparse, json, time
from pathlib import Path
import torch
from cxr_diffusion_nbs.classifier import (ClassifierConfig, train_classifier, save_classifier, load_images, predict_proba,
                                          per_finding_auroc, round_trip)
from cxr_diffusion_nbs.splits import with_held_out_test
from cxr_diffusion_nbs.core import find_data_root
from cxr_diffusion_nbs.manifest import load_shared_subset

ROOT = Path(__file__).resolve().parents[1]

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=None, help='default: the shared subset if present, else the bundled sample')
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--width', type=int, default=24)
    p.add_argument('--size', type=int, default=64, help='image size the classifier sees')
    p.add_argument('--stem', type=int, default=1, help='2: a stride-2 first layer (128 px at the cost of 64)')
    p.add_argument('--low-res', type=int, default=None, help='also train on images brought to this size and back')
    p.add_argument('--test-fraction', type=float, default=0.0, help="hold this share of training patients out ('test')")
    p.add_argument('--out', default=str(ROOT/'data'/'models'/'classifier64'))
    a = p.parse_args()
    real = with_held_out_test(load_shared_subset(a.data) if a.data else load_shared_subset(find_data_root()), a.test_fraction)
    cfg = ClassifierConfig(epochs=a.epochs, width=a.width, image_size=a.size, stem=a.stem, low_res=a.low_res, device='cpu')
    t0 = time.time()
    model, hist = train_classifier(real, cfg, progress=True)
    secs = time.time() - t0
    val = load_images(real, 'val', cfg.image_size, cfg.findings)
    auc = per_finding_auroc(predict_proba(model, val['images']), val['labels'], cfg.findings)
    print(hist.to_string(index=False)); print(auc.to_string(index=False))
    low = {}
    if cfg.low_res:   # the same validation films at the generator's resolution
        auc_low = per_finding_auroc(predict_proba(model, round_trip(val['images'], cfg.low_res)), val['labels'], cfg.findings)
        print(f'at {cfg.low_res} px:'); print(auc_low.to_string(index=False))
        low = {f'val_auroc_at_{cfg.low_res}px': {r.finding: (None if r.auroc != r.auroc else round(float(r.auroc), 3)) for r in auc_low.itertuples()}}
    n_train = int((real.images.split == 'train').sum())
    save_classifier(model.half().float(), cfg, a.out, data=real.name, train_images=n_train, epochs=a.epochs,
                    train_seconds=round(secs, 1), final_loss=round(float(hist.loss.iloc[-1]), 4),
                    val_auroc={r.finding: (None if r.auroc != r.auroc else round(float(r.auroc), 3)) for r in auc.itertuples()},
                    val_positives={r.finding: r.positives for r in auc.itertuples()}, **low,
                    test_fraction=a.test_fraction,
                    made_by='tools/train_classifier.py')
    print('saved', a.out)

if __name__ == '__main__':
    main()
