"""Do synthetic films look real? Every shipped generator with its own defaults, against real films of the test
patients that no model has seen (`realness`, taught in nbs/16a_realness).

Each generator draws `--n` films, each conditioned on a real training film's finding labels and lesion masks (the
donors taken in turn, as a cohort would be). Per generator it prints:

- **FID** (and precision / coverage) in the package's features (the shipped 64-px classifier) against the real
  held-out test films, every image brought to 64 px the same way;
- **detector AUROC**: a small CNN trained from scratch to tell the synthetic films from the real test films, scored
  out of fold, with a 95% bootstrap interval; the first row, real validation films against the same test films, is
  the control: what a generator indistinguishable from real films would get here;
- **sharpness ratio** (median variance of the Laplacian, synthetic / real) and the power ratio in the finest two
  octave bands, `spectrum distance` (mean |log10 power ratio| over all frequencies);
- the coarsest scale: **contrast** (median per-film standard deviation of grey levels) and **brightness spread**
  (standard deviation over films of each film's mean), synthetic / real, and the **coarse detector** AUROC: the same
  detector on films averaged over `--coarse` x `--coarse` blocks, so only their large-scale structure is left;
- seconds per image (drawing only, batch `--batch`, this machine).

`--detector-px 128` (or 256) looks at the films at that size instead (detector, sharpness, spectra; FID stays at 64 px);
`--reconstructions` adds, for each latent generator, the validation films encoded and decoded by its autoencoder: how
real its decoder alone lets films be (nbs/16a_realness).

Then a summary line against the targets (issue 23): a diffusion generator with FID no worse than the GAN's, detector
AUROC <= 0.75 and sharpness within 15% of real films (consistency >= 0.9 for every rare finding is measured by
benchmarks/bench_conditioning.py). Measured in one run, nothing stored unless `--record`; numbers move with `--seed`.

    .venv/bin/python benchmarks/bench_realism.py                                # every shipped generator, 300 films each
    .venv/bin/python benchmarks/bench_realism.py --generators data/models/cpu64_demo --set cpu64_demo:sampler=ddpm,steps=100
    .venv/bin/python benchmarks/bench_realism.py --n 64 --generators data/models/gan64   # quick
    .venv/bin/python benchmarks/bench_realism.py --generators data/models/cpu256_latent_demo --n 120 --reconstructions --detector-px 128
"""
import argparse, json, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_diffusion_nbs import load_generator
from cxr_diffusion_nbs.generators import package_kinds
from cxr_diffusion_nbs.core import CXRDataError, atomic_write, find_data_root, project_root, resolve_path, shareable_path
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.splits import with_held_out_test
from cxr_diffusion_nbs.classifier import to_size
from cxr_diffusion_nbs.metrics import load_image_set, feature_extractor, extract_features, compare_sets
from cxr_diffusion_nbs.condition_fidelity import donor_requests, draw_requests
from cxr_diffusion_nbs.realness import realness

FID_PX = 64                       # the package's feature extractor (data/models/classifier64)
DETECTOR_TARGET, SHARPNESS_TOLERANCE = 0.75, 0.15


def shipped_generators() -> list:
    "Every folder of data/models whose generator.json names a generator kind, sorted by name."
    out = []
    for f in sorted((project_root()/'data'/'models').glob('*/generator.json')):
        try: kind = json.loads(f.read_text()).get('kind')
        except (OSError, ValueError): continue
        if kind in package_kinds(): out.append(f.parent)
    return out


def top_level_split(text: str, sep: str = ',') -> list:
    "`text` split at the `sep`s outside brackets and braces: 'a=1,b={\"x\": 1, \"y\": 2}' -> ['a=1', 'b={\"x\": 1, \"y\": 2}']."
    out, depth, cur = [], 0, ''
    for ch in text:
        depth += (ch in '[{') - (ch in ']}')
        if ch == sep and depth == 0: out.append(cur); cur = ''
        else: cur += ch
    return out + [cur]


def parse_options(items) -> dict:
    "`name:key=value,key=value` -> {name: {key: value}} (values read as JSON where they parse, else strings)."
    out = {}
    for item in items or ():
        name, _, rest = item.partition(':')
        if not rest: raise SystemExit(f'bench_realism: --set {item!r}: expected name:key=value[,key=value]')
        for kv in top_level_split(rest):
            k, _, v = kv.partition('=')
            try: v = json.loads(v)
            except ValueError: pass
            out.setdefault(name, {})[k.strip()] = v
    return out


def fmt(x, d=2) -> str: return 'n/a' if x is None or not np.isfinite(x) else f'{x:.{d}f}'


def real_sets(root, size: int, test_fraction: float) -> dict:
    "Real films at `size` px with the dataset's resizing: the held-out test patients (the reference) and the validation split (the control)."
    man = with_held_out_test(load_shared_subset(root), test_fraction)
    return {s: load_image_set(man, size=size, split=s)['images'] for s in ('test', 'val')}, man


def measure_row(name, x, real, control, ext, f_real, seed, steps, secs, kind='', px=None, options='', coarse=4, detector_px=64,
                fid_films=None):
    "One table row: FID/PRDC at 64 px in the package's features (of `fid_films`, default `x`) and `realness` of `x` against `real` (same size) at `detector_px`."
    f = extract_features(ext, to_size(x if fid_films is None else fid_films, FID_PX))
    fid = compare_sets(f_real, f, seed=seed)
    r = realness(real, x, control=control, size=detector_px, seed=seed, steps=steps, coarse=coarse * detector_px // 64)
    return dict(generator=name, kind=kind, px=px or x.shape[-1], options=options, n=len(x), fid=fid['fid'],
                precision=fid['precision'], coverage=fid['coverage'], detector_px=detector_px, **r, seconds_per_image=secs)


def reconstructions(gen, films, batch: int) -> torch.Tensor:
    "`films` through a latent generator's autoencoder and back (`to_latents`, `to_images`): the ceiling its decoder sets."
    return torch.cat([gen.to_images(gen.to_latents(films[i:i + batch])) for i in range(0, len(films), batch)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--generators', nargs='*', help='model folders (default: every shipped generator in data/models)')
    p.add_argument('--set', nargs='*', default=[], metavar='NAME:KEY=VALUE',
                   help='generate options for one generator, by folder name, e.g. cpu64_demo:sampler=ddpm,steps=100')
    p.add_argument('--n', type=int, default=300, help='films per generator (default 300)')
    p.add_argument('--data-root', help='real data (default: core.find_data_root(), the shared NIH subset if present)')
    p.add_argument('--test-fraction', type=float, default=0.25, help='the held-out test patients, as every trainer holds them out')
    p.add_argument('--detector-steps', type=int, default=300, help="the detector's training steps (batches of 32; default 300)")
    p.add_argument('--coarse', type=int, default=4, help='block size of the coarse detector, in px at 64 px (default 4: 16-px films)')
    p.add_argument('--detector-px', type=int, default=64, choices=(64, 128, 256),
                   help='the size at which the detector, sharpness and spectra look at the films (default 64; FID stays at 64)')
    p.add_argument('--reconstructions', action='store_true',
                   help="for each latent generator, a row more: the validation films through its autoencoder and back "
                        "(how real its decoder alone lets films be)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch', type=int, default=50)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--record', help='append the rows to this CSV (e.g. nbs/images/realness_levers.csv)')
    p.add_argument('--label', default='', help='what the rows are (with --record)')
    a = p.parse_args(argv)
    if a.n < 8: p.error('--n must be >= 8 (the detector needs 4 films per class and fold)')
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    try: rows = run(a)
    except CXRDataError as e: raise SystemExit(f'bench_realism: refused: {e}')
    if a.record: record(a, rows)
    print(f'\ntotal {time.perf_counter() - t0:.0f} s')


def run(a) -> list:
    root = Path(a.data_root) if a.data_root else find_data_root()
    folders = [resolve_path(g) for g in a.generators] if a.generators else shipped_generators()
    options = parse_options(a.set)
    unknown = set(options) - {Path(f).name for f in folders}
    if unknown: raise SystemExit(f'bench_realism: --set names {sorted(unknown)}, not among the generators {[Path(f).name for f in folders]}')
    gens = {Path(f).name: load_generator(f, device='cpu') for f in folders}
    small = [f'{name} ({g.image_size} px)' for name, g in gens.items() if g.image_size < a.detector_px]
    if small: raise SystemExit(f'bench_realism: --detector-px {a.detector_px} would upsample the films of {", ".join(small)}')
    ext = feature_extractor()
    cache, rows = {}, []
    def reals(size):
        if size not in cache: cache[size] = real_sets(root, size, a.test_fraction)
        return cache[size]
    (ref, man) = reals(FID_PX)
    f_test = extract_features(ext, ref['test'])
    print(f"real data: {load_shared_subset(root).name} | reference: {len(ref['test'])} test-patient films | control: "
          f"{len(ref['val'])} validation films | FID in the features of data/models/classifier64 at {FID_PX} px | "
          f"detector {a.detector_steps} steps, 2 folds | seed {a.seed} | torch threads {torch.get_num_threads()}")
    big = reals(a.detector_px)[0]                                         # the real films at the detector's size
    rows.append(measure_row('real validation films (control)', big['val'], big['test'], None, ext, f_test, a.seed, a.detector_steps,
                            float('nan'), 'real', a.detector_px, coarse=a.coarse, detector_px=a.detector_px, fid_films=ref['val']))
    for name, gen in gens.items():
        opts = options.get(name, {})
        req = donor_requests(man, 'train', gen.findings, gen.image_size, FID_PX)
        donors = np.random.default_rng(a.seed).permutation(len(req.labels))[np.arange(a.n) % len(req.labels)]   # each donor once, then again
        t = time.perf_counter()
        x = draw_requests(gen, req, donors, seed=a.seed, batch=a.batch, **opts)
        secs = (time.perf_counter() - t) / len(x)
        (real, _) = reals(gen.image_size)
        used = ', '.join(f'{k}={v}' for k, v in (opts or {}).items()) or 'defaults'
        print(f"{name}: {gen.kind}, {gen.image_size} px, {used}: {len(x)} films in {secs * len(x):.0f} s", flush=True)
        rows.append(measure_row(name, x, real['test'], real['val'], ext, f_test, a.seed, a.detector_steps, secs, gen.kind,
                                gen.image_size, used, a.coarse, a.detector_px))
        if a.reconstructions and gen.has_latents:
            t = time.perf_counter()
            rec = reconstructions(gen, real['val'], a.batch)
            rows.append(measure_row(f'{name} autoencoder reconstructions', rec, real['test'], real['val'], ext, f_test, a.seed,
                                    a.detector_steps, (time.perf_counter() - t) / len(rec), 'reconstruction', gen.image_size,
                                    'validation films encoded and decoded', a.coarse, a.detector_px))
    table(rows)
    summary(rows)
    return rows


def table(rows):
    print(f"\n{'generator':<32} {'px':>4} {'FID':>6} {'prec':>5} {'cov':>5}  {'detector AUROC':>20} {'control':>7}  "
          f"{'sharp':>5} {'8-16':>5} {'16-32':>5} {'spec':>5} {'contr':>5} {'brght':>5} {'coarse':>6} {'s/img':>6}  options")
    for r in rows:
        print(f"{r['generator'][:32]:<32} {r['px']:>4} {fmt(r['fid']):>6} {fmt(r['precision']):>5} {fmt(r['coverage']):>5}  "
              f"{fmt(r['detector_auroc']):>5} [{fmt(r['detector_auroc_low'])}, {fmt(r['detector_auroc_high'])}]   "
              f"{fmt(r.get('control_auroc', np.nan)):>7}  {fmt(r['sharpness_ratio']):>5} {fmt(r.get('band_8_16', np.nan)):>5} "
              f"{fmt(r.get('band_16_32', np.nan)):>5} {fmt(r['spectrum_distance']):>5} {fmt(r['contrast_ratio']):>5} "
              f"{fmt(r['brightness_spread_ratio']):>5} {fmt(r.get('coarse_detector_auroc', np.nan)):>6} {fmt(r['seconds_per_image'], 3):>6}  {r['options']}")
    print("(detector AUROC: 0.5 = cannot tell the films from real ones; control: the same detector on real validation films "
          "against the same reference; sharp: median Laplacian variance over real's; 8-16 / 16-32: power over real's in those "
          "cycles-per-image bands at the detector's size; spec: mean |log10 power ratio|; contr / brght: per-film contrast and the spread "
          "of films' brightness over real's; coarse: the detector on block-averaged films)")


def summary(rows):
    gans = [r for r in rows if r['kind'] == 'gan']
    diff = [r for r in rows if r['kind'].endswith('diffusion')]
    gan_fid = min((r['fid'] for r in gans), default=None)
    print(f"\ntargets (issue 23): a diffusion generator with FID <= the GAN's ({fmt(gan_fid)}), detector AUROC <= "
          f"{DETECTOR_TARGET}, sharpness within {SHARPNESS_TOLERANCE:.0%} of real")
    met_any = False
    for r in diff:
        checks = dict(FID='no GAN measured' if gan_fid is None else ('met' if r['fid'] <= gan_fid else f"missed ({fmt(r['fid'])})"),
                      detector='met' if r['detector_auroc'] <= DETECTOR_TARGET else f"missed ({fmt(r['detector_auroc'])})",
                      sharpness='met' if abs(r['sharpness_ratio'] - 1) <= SHARPNESS_TOLERANCE else f"missed ({fmt(r['sharpness_ratio'])})")
        ok = all(v == 'met' for v in checks.values())
        met_any |= ok
        print(f"  {r['generator']} ({r['options']}): " + ' | '.join(f'{k} {v}' for k, v in checks.items()) + (' -> all met' if ok else ''))
    print(f"  summary: {'a diffusion generator meets every realism target' if met_any else 'no diffusion generator meets every realism target'}"
          f" ({len(diff)} measured)")


def record(a, rows):
    "Append the rows to the CSV `a.record` (written atomically)."
    import datetime
    append_rows(a.record, [dict(label=a.label, seed=a.seed, date=datetime.date.today().isoformat(),
                                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}) for r in rows])


def append_rows(path, rows: list):
    "Append `rows` (dicts) to the CSV `path` (written atomically); the lever scripts record through it too."
    path = resolve_path(path)
    prev = pd.read_csv(path) if path.exists() else pd.DataFrame()
    with atomic_write(path) as tmp: pd.concat([prev, pd.DataFrame(rows)], ignore_index=True).to_csv(tmp, index=False)
    print(f"recorded in {shareable_path(path)}")


if __name__ == '__main__':
    main()
