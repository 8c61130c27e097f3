"""A sampling lever of issue 23: the lesion mask guided over the high-noise part of the schedule only.

nbs/16a_realness found that the shipped 64-px demo's films are easier to tell from real ones when drawn with their
donors' lesion masks (detector 0.95) than with the labels alone (0.86). This script asks whether the mask needs its
guidance at every step: the demo draws with its recommended settings (nested guidance, labels 4, mask 2, DPM-Solver++
20 stopping at sigma_min) and the sampler option `guidance_interval={'mask': [below, 1000]}` (`11_sampling`): the
mask is guided at timesteps >= `--below` and is a plain condition (scale 1, unguided) below. Everything else (seeds,
donors, sampler, checks) is the generator's own.

For each setting it measures, as the rest of 16a does:
- realness: 120 films for training donors against the 328 held-out test films (`bench_realism.measure_row`: FID in
  the package's features, the real-vs-synthetic detector, sharpness, spectrum), appended to
  nbs/images/realness_training_levers.csv with `--record-realness <csv>`;
- conditioning fidelity: one film per validation donor, judged by the 128-px judges (`condition_fidelity.measure`:
  class consistency per rare finding, mask adherence), appended to nbs/images/mask_interval_fidelity.csv with
  `--record-fidelity <csv>`, with the demo's own defaults drawn beside them. Nothing is stored without them.

    .venv/bin/python benchmarks/lever_mask_interval.py --below 250         # about 10 CPU-min
    .venv/bin/python benchmarks/lever_mask_interval.py --below 250 --record-realness nbs/images/realness_training_levers.csv \
        --record-fidelity nbs/images/mask_interval_fidelity.csv            # the rows 16a reads
    .venv/bin/python benchmarks/lever_mask_interval.py --generator runs/models/lat_heun10 --below 250   # any generator folder with a mask condition

Measured in nbs/16a_realness ("The mask over part of the noise range"): the mask guided only at t >= 250 brings the
detector from 0.95 to about 0.78 with FID and class consistency unchanged and mask adherence 0.86 of the real ceiling
(0.97 with guidance at every step); the lesion's outline is drawn in the last steps, the very ones that gave the
films away. (Dropping the mask altogether below t, also in that table, was measured by this script's first version,
which patched the loop, commit 5262924: adherence fell to 0.70-0.72.)
"""
import argparse, datetime, sys, time
from pathlib import Path
import numpy as np, pandas as pd, torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_realism as br
from cxr_diffusion_nbs import sampling
from cxr_diffusion_nbs.core import find_data_root, project_root
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.metrics import feature_extractor, extract_features
from cxr_diffusion_nbs.condition_fidelity import donor_requests, draw_requests, measure, load_judges

DEMO = project_root()/'data'/'models'/'cpu64_demo'


def setting_name(name: str, gen, below) -> str:
    mask = gen.defaults.get('guidance', {}).get('mask')
    if below is None: return f'{name}, defaults (mask {mask:g} at every step)'
    return f'{name}, mask {mask:g} for t>={below}, scale 1 below'


def interval(below) -> dict:
    "The sampler option of a setting (None: the demo's defaults)."
    return {} if below is None else dict(guidance_interval={'mask': [below, 1000]})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--generator', default=str(DEMO), help='generator folder (default: the shipped 64-px demo); its defaults are the baseline')
    p.add_argument('--below', type=int, nargs='+', required=True, help='timesteps below which the mask is not guided (e.g. 500 250)')
    p.add_argument('--n', type=int, default=120, help='films per setting for realness (default 120)')
    p.add_argument('--no-defaults', action='store_true', help="skip the demo's defaults row of the fidelity table")
    p.add_argument('--record-realness', help='append the realness rows to this CSV (e.g. nbs/images/realness_training_levers.csv)')
    p.add_argument('--record-fidelity', help='append the fidelity rows to this CSV (e.g. nbs/images/mask_interval_fidelity.csv)')
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    if any(b < 0 or b > 1000 for b in a.below): p.error('--below: timesteps in [0, 1000]')
    torch.set_num_threads(2)
    gen = sampling.load_generator(a.generator, device='cpu')
    if 'mask' not in gen.defaults.get('guidance', {}): p.error(f'--generator {a.generator}: its defaults guide no mask')
    name = Path(a.generator).name
    root = find_data_root()
    settings = list(a.below)

    ref, man = br.real_sets(root, 64, 0.25)
    big = ref if gen.image_size == 64 else br.real_sets(root, gen.image_size, 0.25)[0]   # the reference at the generator's size
    ext = feature_extractor(); f_test = extract_features(ext, ref['test'])
    req = donor_requests(man, 'train', gen.findings, gen.image_size, br.FID_PX)
    donors = np.random.default_rng(a.seed).permutation(len(req.labels))[np.arange(a.n) % len(req.labels)]
    rows = [br.measure_row('real validation films (control)', ref['val'], ref['test'], None, ext, f_test, a.seed, 300,
                           float('nan'), 'real', 64, fid_films=ref['val'])]
    for below in settings:
        t = time.perf_counter()
        x = draw_requests(gen, req, donors, seed=a.seed, batch=50, **interval(below))
        secs = (time.perf_counter() - t) / len(x)
        g = gen.defaults['guidance']
        rows.append(br.measure_row(setting_name(name, gen, below), x, big['test'], big['val'], ext, f_test, a.seed, 300, secs,
                                   gen.kind, gen.image_size, f"labels {g.get('labels', 0):g} at every step, mask {g['mask']:g} for t>={below} and 1 below"))
    br.table(rows)
    if a.record_realness: br.append_rows(a.record_realness, [dict(label=f'mask condition over the high-noise part only (benchmarks/lever_mask_interval.py'
                                    + ('' if name == 'cpu64_demo' else f' --generator {name}') + ')',
                                    seed=a.seed, date=datetime.date.today().isoformat(),
                                    **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}) for r in rows])

    real = load_shared_subset(root); judges = load_judges(128)
    vreq = donor_requests(real, 'val', list(gen.findings), gen.image_size, judges.size)
    out = []
    for below in ([] if a.no_defaults else [None]) + settings:
        s = measure(gen, real, 'val', judges, req=vreq, seed=a.seed, batch=32, **{**gen.defaults, **interval(below)}).summary()
        out.append(dict(setting=setting_name(name, gen, below), below=below, low_mask=None if below is None else 1.0, donors=len(vreq.image_ids), seed=a.seed,
                        **{k: round(v, 4) for k, v in s.items() if k.startswith(('consistency_', 'adherence', 'fid'))},
                        date=datetime.date.today().isoformat()))
        print(out[-1], flush=True)
    if a.record_fidelity: br.append_rows(a.record_fidelity, out)


if __name__ == '__main__':
    main()
