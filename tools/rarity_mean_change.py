"""The primary endpoint of finished rarity studies (`cxr-rarity`), and the studies compared with the first: the mean
AUROC change over the rare findings of each study's declared primary arm against real-only, with a paired bootstrap
over test patients (`rarity.primary_endpoint`), then every pair of studies, the primary arm of one against the other's
on the same test patients and resamples (`rarity.compare_studies`; the studies must share their data and test split).

    for g in gan64 cpu64_demo; do .venv/bin/cxr-rarity --config configs/rarity_generators.yaml \\
        --checkpoint data/models/$g --output runs/rarity_$g; done
    .venv/bin/python tools/rarity_mean_change.py runs/rarity_cpu64_demo runs/rarity_gan64

Prints one line per study and per comparison (`rarity.endpoint_line`): the mean change, its 95% interval, the
bootstrap p, the minimum detectable effect at 80% power, the spread of the mean change over seeds, and the change
per finding. `--arms` also gives, within each study, every arm at k and n against real-only and every two arms against
each other (the primary arm first) (e.g. lesion insertion against copy-paste and the healthy inpainting:
`configs/rarity_insert.yaml`). `--csv` also writes them as a table (one row per line printed, with the AUROC of the study's classifier
that tells its synthetic pool from real training films, `realness.json`; stored in nbs/images/ for 19a_rarity).
"""
import argparse, json
from pathlib import Path
import numpy as np, pandas as pd
from cxr_diffusion_nbs.core import write_shared_csv
import dataclasses
from cxr_diffusion_nbs.rarity import RarityConfig, primary_endpoint, compare_studies, endpoint_line, load_predictions


def study_config(folder) -> RarityConfig:
    "The config a study folder was run with (its `study.json`: the identity's fields and the declared primary comparison)."
    s = json.loads((Path(folder)/'study.json').read_text())
    cfg = dict(s['config'])
    if 'primary' in s:   # the plan fields are not in the identity: the primary comparison's own are enough to read it
        k, arm, n = (s['primary'][f] for f in ('k', 'arm', 'n'))
        cfg.update(primary=s['primary'], ks=[k], arms=[arm], n_synthetic=[0, n], arm_n=n)
    return RarityConfig.from_dict(cfg, str(Path(folder)/'study.json'))


def pool_realness(folder) -> float:
    "AUROC of the study's real-vs-synthetic classifier on its conditional pool (`realness.json`; NaN without one)."
    f = Path(folder)/'realness.json' if folder else None
    return json.loads(f.read_text())['auroc'] if f and f.exists() else float('nan')


def study_arms(folder) -> list:
    "The arms a study folder has predictions for (`rarity.load_predictions`), real-only left out."
    return sorted({arm for (_, arm, _, _) in load_predictions(folder)[0]} - {'real-only'})


def arm_comparisons(folder, cfg: RarityConfig, n_boot: int) -> dict:
    """Within one study: every arm (at the primary k and n) against real-only, then every two arms against each other
    (the primary arm first), on the same test patients and resamples (`primary_endpoint` with the first declared)."""
    k, primary, n = cfg.primary_comparison()
    arms, out, name = study_arms(folder), {}, Path(folder).name
    for arm in arms:
        if arm == primary: continue
        c = dataclasses.replace(cfg, arms=tuple(sorted(set(cfg.arms) | {arm})), primary=dict(k=k, arm=arm, n=n))
        r = primary_endpoint(folder, c, n_boot=n_boot); out[f'{name}: {arm}'] = r
        print(endpoint_line(r, f'{name}: {arm} - real-only'))
    order = [primary] + [a for a in arms if a != primary]
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            c = dataclasses.replace(cfg, arms=tuple(sorted(set(cfg.arms) | {a, b})), primary=dict(k=k, arm=a, n=n))
            r = primary_endpoint(folder, c, against=b, n_boot=n_boot); out[f'{name}: {a} - {b}'] = r
            print(endpoint_line(r, f'{name}: {a} - {b}'))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('studies', nargs='+', help='rarity study folders (each pair is compared)')
    ap.add_argument('--n-boot', type=int, default=2000)
    ap.add_argument('--arms', action='store_true', help="within each study: every arm against real-only, the primary arm against the others")
    ap.add_argument('--csv', help='also write the results to this CSV file')
    a = ap.parse_args(argv)
    out = {}
    cfgs = [study_config(f) for f in a.studies]
    for f, cfg in zip(a.studies, cfgs):
        r = primary_endpoint(f, cfg, n_boot=a.n_boot); out[Path(f).name] = r
        print(endpoint_line(r, Path(f).name))
    if a.arms:
        for f, cfg in zip(a.studies, cfgs):
            out.update(arm_comparisons(f, cfg, a.n_boot))
    for i, f in enumerate(a.studies):
        for g in a.studies[i + 1:]:
            name = f'{Path(f).name} - {Path(g).name}'
            r = compare_studies(f, g, cfgs[i], n_boot=a.n_boot); out[name] = r
            print(endpoint_line(r, name))
    if a.csv:
        folders = {Path(f).name: f for f in a.studies}
        rows = [dict(comparison=name, k=r['k'], arm=r['arm'], n=r['n'], against=r.get('against', name.split(' - ')[-1]),
                     seeds=len(r['seeds']), mean_change=r['mean'], lo=r['lo'], hi=r['hi'], p=r['p'], mde=r['mde'], seed_sd=r.get('seed_sd', np.nan),
                     pool_detector_auroc=pool_realness(folders.get(name)),
                     **{f: v for f, v in zip(r['findings'], r['per_finding'])}) for name, r in out.items()]
        write_shared_csv(pd.DataFrame(rows).round(4), Path(a.csv))


if __name__ == '__main__': main()
