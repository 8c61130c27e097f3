"""Train the classifier shipped in data/models/classifier64 (the domain feature extractor and class-consistency
judge used by the evaluation notebooks): the shared NIH subset's training split at 64 px, 5 rare findings.

    .venv/bin/python tools/train_classifier.py [--data ../shared/data/nih_cxr14_subset] [--epochs 12] [--out data/models/classifier64]
"""
import argparse, json, time
from pathlib import Path
import torch
from cxr_diffusion_nbs.classifier import ClassifierConfig, train_classifier, save_classifier, predict, per_finding_auroc
from cxr_diffusion_nbs.core import find_data_root
from cxr_diffusion_nbs.manifest import load_shared_subset

ROOT = Path(__file__).resolve().parents[1]

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=None, help='default: the shared subset if present, else the bundled sample')
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--width', type=int, default=24)
    p.add_argument('--out', default=str(ROOT/'data'/'models'/'classifier64'))
    a = p.parse_args()
    real = load_shared_subset(a.data) if a.data else load_shared_subset(find_data_root())
    cfg = ClassifierConfig(epochs=a.epochs, width=a.width, device='cpu')
    t0 = time.time()
    model, hist = train_classifier(real, cfg, progress=True)
    secs = time.time() - t0
    val = predict(model, real, 'val', findings=cfg.findings)
    auc = per_finding_auroc(val['probs'], val['labels'], cfg.findings)
    print(hist.to_string(index=False)); print(auc.to_string(index=False))
    n_train = int((real.images.split == 'train').sum())
    save_classifier(model.half().float(), cfg, a.out, data=real.name, train_images=n_train, epochs=a.epochs,
                    train_seconds=round(secs, 1), final_loss=round(float(hist.loss.iloc[-1]), 4),
                    val_auroc={r.finding: (None if r.auroc != r.auroc else round(float(r.auroc), 3)) for r in auc.itertuples()},
                    val_positives={r.finding: r.positives for r in auc.itertuples()},
                    made_by='tools/train_classifier.py')
    print('saved', a.out)

if __name__ == '__main__':
    main()
