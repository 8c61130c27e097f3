"""What do the classical restorers achieve on degraded radiographs, and what do the learned ones add?

Validation films (the shared NIH subset when present, else the bundled sample; the held-out test patients moved out)
are degraded by every type and level of `restoration.LEVELS` (quantum noise at a dose, read noise, blur, downsampling
by 2 and 4, JPEG, low contrast), each film with its own seed. Each restorer of `restoration.BASELINES` (the degraded
input, scikit-image's non-local means, total variation and wavelet shrinkage, and bicubic interpolation for
downsampling) is tuned on half of the films (the best mean PSNR over its small grid) and measured on the other half.
Learned restorers given with `--restorer` (a restorer folder such as `data/models/restorer128_diffusion`) are measured
on the same films at the levels of the degradation types they were trained on, with no tuning; for them the script
also measures the perception side: FID and KID of the restored films against the clean ones, in the features of the
shipped CXR classifier at the films' size (`metrics.feature_extractor`).

It prints the table (type x level x method: PSNR, gain over the degraded input, SSIM, lesion-region SSIM, the tuned
parameters), the time taken, one summary line (the best classical method per degradation type) and, with learned
restorers, the FID table and a line per target: the diffusion restorer against the best classical method in PSNR and
SSIM at every level it covers, and its FID against the regressor's. Measured numbers, not a test.

    .venv/bin/python benchmarks/bench_restoration.py                                   # 64 films at 128 px, classical only
    .venv/bin/python benchmarks/bench_restoration.py --size 64 --films 16 --kinds noise,jpeg
    .venv/bin/python benchmarks/bench_restoration.py --csv nbs/images/restoration_baselines.csv
    .venv/bin/python benchmarks/bench_restoration.py --kinds noise,read_noise,downsample \\
        --restorer data/models/restorer128_diffusion --restorer data/models/restorer128_regression \\
        --csv nbs/images/restoration_learned.csv
"""
import argparse, time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_diffusion_nbs.core import atomic_write, project_root
from cxr_diffusion_nbs.restoration import (BASELINES, Baseline, Degradation, all_conditions, batched_restorer, restoration_films,
                                           restoration_table, split_films, summary_line, to_signed)

CLASSICAL = ('nl_means', 'tv', 'wavelet', 'bicubic')


def recording(restorer, name: str, store: dict, **options):
    "`restorer` as a batched restorer that also keeps what it was given and what it returned, per degradation label."
    @batched_restorer
    def fn(x, **info):
        y = restorer.restore(x, **options)
        label = Degradation(**info).label
        store[(name, label)], store[('degraded', label)] = y, x
        return y
    return fn


def perception_table(store: dict, clean: np.ndarray, size: int) -> pd.DataFrame:
    "FID and KID of each recorded set of restored films against the clean films (classifier features at `size` px)."
    from cxr_diffusion_nbs.metrics import extract_features, feature_extractor, fid_from_features, kid_from_features
    ext = feature_extractor(project_root()/'data'/'models'/f'classifier{size}') if size in (64, 128) else feature_extractor(image_size=size)
    ref = extract_features(ext, to_signed(clean).float())
    rows = []
    for (name, label), x in store.items():
        f = extract_features(ext, x.float())
        kid, _ = kid_from_features(ref, f, subsets=50, subset_size=max(2, min(len(f), len(ref)) // 2))
        rows.append(dict(spec=label, method=name, fid=fid_from_features(ref, f), kid=kid, n=len(f)))
    return pd.DataFrame(rows).sort_values(['spec', 'method']).reset_index(drop=True)


def target_lines(table: pd.DataFrame, fid: pd.DataFrame | None) -> list:
    "The issue's targets as measured, per diffusion restorer: against the best classical method per level, and its FID against the regressor's."
    out = []
    for d in [m for m in dict.fromkeys(table.method) if 'diffusion' in m]:
        met, rows = 0, []
        for (kind, level), g in table.groupby(['kind', 'level'], sort=False):
            g = g.set_index('method')
            if d not in g.index: continue
            cl = g.loc[[m for m in CLASSICAL if m in g.index]]
            ok = g.at[d, 'psnr'] > cl.psnr.max() and g.at[d, 'ssim'] > cl.ssim.max()
            met += ok
            rows.append(f"{kind} {level} {'met' if ok else 'NOT met'} (PSNR {g.at[d, 'psnr']:.2f} vs {cl.psnr.max():.2f} {cl.psnr.idxmax()}, "
                        f"SSIM {g.at[d, 'ssim']:.3f} vs {cl.ssim.max():.3f} {cl.ssim.idxmax()})")
        out.append(f'target 1, {d} beats the best classical method in PSNR and SSIM: {met}/{len(rows)} levels: ' + '; '.join(rows))
        if fid is not None and {d, 'regression'} <= set(fid.method):
            f = fid.pivot(index='spec', columns='method', values='fid')
            wins = int((f[d] < f['regression']).sum())
            out.append(f"target 2, FID of {d} below the regressor's: {wins}/{len(f)} levels (mean FID {d} "
                       f"{f[d].mean():.2f}, regression {f['regression'].mean():.2f}, degraded {f['degraded'].mean():.2f})")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=128, help='film size in pixels (default 128)')
    p.add_argument('--films', type=int, default=64, help='validation films in all: half tune, half are measured (default 64)')
    p.add_argument('--tune', type=int, default=None, help='of which tuning films (default half)')
    p.add_argument('--kinds', default=None, help='degradation types, comma-separated (default: all)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--split', default='val')
    p.add_argument('--restorer', action='append', default=[], help='a learned restorer folder to measure too (repeatable)')
    p.add_argument('--steps', type=int, default=None, help="sampling steps of diffusion restorers (default: the restorer's)")
    p.add_argument('--samples', type=int, default=1, help='diffusion restorers: average this many draws per film (default 1)')
    p.add_argument('--csv', default=None, help='also write the table to this CSV file (and the FID table beside it)')
    a = p.parse_args(argv)
    conditions = all_conditions(a.kinds.split(',') if a.kinds else None)
    t0 = time.perf_counter()
    films = restoration_films(n=a.films, size=a.size, split=a.split)
    restorers, store = dict(BASELINES), {}
    if a.restorer:
        from cxr_diffusion_nbs.restorer import load_restorer
        for path in a.restorer:
            r = load_restorer(path)
            opts = {**({'steps': a.steps} if a.steps else {}), 'samples': a.samples} if r.objective == 'diffusion' else {}
            name = r.name + (f' x{a.samples}' if a.samples > 1 and r.objective == 'diffusion' else '')
            restorers[name] = Baseline(recording(r, name, store, **opts), {}, needs=tuple(r.info['kinds']))
    table = restoration_table(films['clean'], films['masks'], conditions=conditions, restorers=restorers, n_tune=a.tune, seed=a.seed)
    secs = time.perf_counter() - t0
    n_eval, n_lesion = int(table.n_films.iloc[0]), int(table.n_lesion.iloc[0])
    print(f"{films['source']}, split {a.split}: {a.films} films at {a.size} px, {a.films - n_eval} for tuning, "
          f"{n_eval} measured ({n_lesion} with a lesion outline); seed {a.seed}; {secs:.0f} s")
    with pd.option_context('display.width', 200, 'display.max_rows', 500):
        print(table.drop(columns=['n_films', 'n_lesion']).round(3).to_string(index=False))
    fid = None
    if store:
        fid = perception_table(store, films['clean'][split_films(a.films, a.tune)[1]], a.size)
        print('\nperception: FID / KID of the restored films against the clean ones (CXR classifier features)')
        print(fid.round(4).to_string(index=False))
    if a.csv:
        with atomic_write(Path(a.csv)) as tmp: table.round(4).to_csv(tmp, index=False)
        if fid is not None:
            with atomic_write(Path(a.csv).with_name(Path(a.csv).stem + '_fid.csv')) as tmp: fid.round(4).to_csv(tmp, index=False)
        print('table written to', a.csv)
    print(summary_line(table, exclude=('degraded', *[m for m in dict.fromkeys(table.method) if m not in CLASSICAL])))
    for line in target_lines(table, fid): print(line)


if __name__ == '__main__':
    main()
