"""The mean AUROC change over the rare findings of a finished rarity study (`cxr-rarity`), with a paired bootstrap
interval over the test films: the seed-ensembled classifier of one arm against the real-only one, as issue 23 compares
generators (k = 20, mix, n = 100, three seeds):

    .venv/bin/cxr-rarity --checkpoint data/models/cpu64_demo --output runs/rarity23/cpu64_demo --set 'seeds=[0,1,2]'
    .venv/bin/cxr-rarity --checkpoint data/models/gan64 --output runs/rarity23/gan64 --set 'seeds=[0,1,2]'
    .venv/bin/python tools/rarity_mean_change.py runs/rarity23/cpu64_demo runs/rarity23/gan64

Prints one line per study: the change per finding and the mean with its 95% interval (resampling the test films, the
same resample for every finding, so the findings' correlation is kept). Studies that share their real-only
classifiers (the same data, caps and seeds) are also compared in pairs: the first against each other one, on the same
resamples.
"""
import argparse, json
from pathlib import Path
import numpy as np
from cxr_diffusion_nbs.rarity import load_predictions
from cxr_diffusion_nbs.downstream import auroc


def mean_change(folder, k: int, arm: str, n: int, n_boot: int = 2000, seed: int = 0) -> dict:
    "Per-finding and mean AUROC change (seed ensemble of `arm` at n against real-only at k) with a bootstrap interval."
    preds, facts = load_predictions(folder)
    findings = json.loads((Path(folder)/'study.json').read_text())['config']['findings']
    internal = ~facts['source'].astype(str).str.startswith('real external').to_numpy()
    Y = facts[findings].replace('', np.nan).to_numpy(float)[internal]
    seeds = sorted(s for (kk, a, nn, s) in preds if (kk, a, nn) == (k, arm, n) and (k, 'real-only', 0, s) in preds)
    if not seeds: raise SystemExit(f'rarity_mean_change: {folder}: no k={k} {arm} n={n} runs with a real-only reference')
    p = np.mean([preds[(k, arm, n, s)] for s in seeds], 0)[internal]
    r = np.mean([preds[(k, 'real-only', 0, s)] for s in seeds], 0)[internal]
    def change(idx):
        out = []
        for j in range(len(findings)):
            y = Y[idx, j]; kn = ~np.isnan(y)
            out.append(auroc(y[kn], p[idx, j][kn]) - auroc(y[kn], r[idx, j][kn]))
        return np.array(out)
    full, rng = change(np.arange(len(Y))), np.random.default_rng(seed)
    resamples = [rng.integers(0, len(Y), len(Y)) for _ in range(n_boot)]
    boots = np.array([change(i).mean() for i in resamples])
    lo, hi = np.quantile(boots, [.025, .975])
    return dict(study=Path(folder).name, seeds=seeds, test_films=len(Y), per_finding=dict(zip(findings, full.round(3).tolist())),
                mean=float(full.mean()), lo=float(lo), hi=float(hi), boots=boots, reference=r)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('studies', nargs='+', help='rarity study folders')
    ap.add_argument('--k', type=int, default=20); ap.add_argument('--arm', default='mix'); ap.add_argument('--n', type=int, default=100)
    ap.add_argument('--n-boot', type=int, default=2000)
    a = ap.parse_args(argv)
    ms = [mean_change(f, a.k, a.arm, a.n, a.n_boot) for f in a.studies]
    for m in ms:
        per = ', '.join(f'{k} {v:+.3f}' for k, v in m['per_finding'].items())
        print(f"{m['study']}: seeds {m['seeds']}, {m['test_films']} test films | {per} | mean {m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}]")
    for m in ms[1:]:
        if m['reference'].shape != ms[0]['reference'].shape or not np.allclose(m['reference'], ms[0]['reference'], atol=1e-6):
            print(f"{ms[0]['study']} - {m['study']}: not compared (their real-only classifiers differ)"); continue
        lo, hi = np.quantile(ms[0]['boots'] - m['boots'], [.025, .975])      # same seed: the same resamples
        print(f"{ms[0]['study']} - {m['study']}: mean change {ms[0]['mean'] - m['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == '__main__': main()
