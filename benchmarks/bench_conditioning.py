"""Does a generator draw what it is asked for? Class consistency, mask adherence, lesion contrast and FID on the
validation split, measured by the 128-px judges (`condition_fidelity.measure`, taught in nbs/17a_condition_fidelity).

Every real validation image becomes one synthetic request: its finding labels (an outlined lesion counts as positive,
as in training) and its lesion masks, so the synthetic and the real set carry the same conditions, donor by donor.
The judges (`data/models/classifier128`, `segmenter128`) were trained on real films with the study's test patients
held out, and also on 64-px round trips; a 64-px generator's image is brought to 128 px, and the real reference is
the donor film at the generator's resolution. Per rare finding it prints:

- **consistency ratio** = the judge's AUROC for "asked for f" on synthetic images / its AUROC for f on the real films
  (with DeLong 95% intervals, and the AUROC on native 128-px films: what the generator's resolution costs);
- **adherence ratio** = the segmenter's Dice with the asked-for mask / the same on the real donor films (ceiling),
  over the donors with complete lesion outlines; the floor (another donor's mask) for scale;
- **lesion contrast** ratio (lesion minus surrounding ring, synthetic / real) and per-finding **coverage**;
- **FID** (and precision, coverage) in the judge's features, against the target: no worse than the demo model of
  issue 9 (`condition_fidelity.FID_TARGET`, measured with these judges on the same requests);
- **realness** of the same synthetic images against the same real donor films (`realness.realness`, taught in
  nbs/16a_realness): a small CNN trained from scratch to tell them apart, scored out of fold (AUROC with a bootstrap
  95% interval; 0.5 = it cannot), the same detector on real films of another split (the training split) against the
  donor films as the control, the sharpness ratio (variance of the Laplacian, synthetic / real) and the spectral
  power ratio per octave band. Both sets are brought to the smaller of the generator's and the judges' size with
  `classifier.to_size`, and compared there (at most `REALNESS_PX`, 64 px, the size `realness` compares at).

Targets (issue 10): consistency ratio >= 0.9 for every rare finding; adherence >= 0.8 of the real ceiling; FID no
worse than FID_TARGET. A row resting on fewer than `--min-positives` (20) real positives or lesion images is flagged
"too few to conclude". Measured in one run, nothing stored; numbers move with `--seed`.

    .venv/bin/python benchmarks/bench_conditioning.py                          # the shipped demo, all validation donors
    .venv/bin/python benchmarks/bench_conditioning.py --guidance labels=3,mask=1 --guidance-mode nested
    .venv/bin/python benchmarks/bench_conditioning.py --checkpoint runs/cpu64 --repeats 2
    .venv/bin/python benchmarks/bench_conditioning.py --screen 4                # best of 4 by the 64-px screener (nbs/17b_screening)
    .venv/bin/python benchmarks/bench_conditioning.py --guidance none --sampler dpmpp --steps 20 --save nbs/images/demo_fidelity.json   # nbs/17a's tables
"""
import argparse, datetime, json, math, shlex, sys, time
from pathlib import Path

import numpy as np
import torch

from cxr_diffusion_nbs import load_generator
from cxr_diffusion_nbs.core import CXRDataError, find_data_root, resolve_path, shareable_path
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.condition_fidelity import FID_TARGET, load_judges, measure, donor_requests   # FID_TARGET: the issue-9 demo, measured here
from cxr_diffusion_nbs.adherence import load_masked_images
from cxr_diffusion_nbs.classifier import to_size
from cxr_diffusion_nbs.realness import realness
from cxr_diffusion_nbs.screening import ScreenedGenerator, load_screener
from cxr_diffusion_nbs.sampling import SAMPLERS, GUIDANCE_MODES, _parse_scales

DEMO = 'data/models/cpu64_demo'
CONSISTENCY_TARGET, ADHERENCE_TARGET = 0.9, 0.8
REALNESS_PX = 64                 # realness compares at most at this size (its default: every generator judged alike)


def fmt(x, d=2) -> str: return 'n/a' if x is None or not np.isfinite(x) else f'{x:.{d}f}'
def ci(c) -> str: return '' if not isinstance(c, tuple) or not np.isfinite(c[0]) else f'[{c[0]:.2f}, {c[1]:.2f}]'
def verdict(v, target) -> str:
    if v is None or not np.isfinite(v): return 'no reference'
    return 'met' if v >= target else f'missed by {target - v:.2f}'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default=DEMO, help='generator to measure (any folder load_generator opens; default: the demo)')
    p.add_argument('--judges', type=int, default=128, help='size of the shipped judges (data/models/classifier<N>, segmenter<N>)')
    p.add_argument('--classifier', help='judge classifier folder instead (save_classifier)')
    p.add_argument('--segmenter', help='judge segmenter folder instead (save_segmenter)')
    p.add_argument('--data-root', help='real data (default: core.find_data_root(), the shared NIH subset if present)')
    p.add_argument('--split', default='val', help='real split whose images are the donors and the reference (default: val)')
    p.add_argument('--repeats', type=int, default=1, help='synthetic images per real donor (default 1)')
    p.add_argument('--n-per-finding', type=int, default=0, help='top every rare finding up to this many synthetic positives')
    p.add_argument('--sampler', default='dpmpp', choices=SAMPLERS)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--mixed-precision', default='no', choices=['no', 'bf16'],
                   help='bf16: sample under bfloat16 autocast (1.5-2x faster on a CPU with native bf16; not bit-exact)')
    p.add_argument('--guidance', default='', help="per-condition scales, e.g. labels=3,mask=1; 'none': no guidance (default: the generator's recommended)")
    p.add_argument('--guidance-mode', default=None, choices=GUIDANCE_MODES, help="default: the generator's own")
    p.add_argument('--screen', type=int, default=1, help='candidates per request, the best kept by the screener (screening.ScreenedGenerator; 1 = none)')
    p.add_argument('--screener', help='screening judges folder (default: data/models/screener64)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--min-positives', type=int, default=20, help='fewer real positives / lesion images: "too few to conclude"')
    p.add_argument('--realness-steps', type=int, default=300, help="training steps of each realness detector (default 300, realness's own)")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--progress', action='store_true', help='print a line per batch drawn (for long runs such as DDPM 1000 steps)')
    p.add_argument('--record', help='append the summary as a row to this CSV (the experiments table of nbs/17a_condition_fidelity)')
    p.add_argument('--label', default='', help='what the row is (with --record), e.g. "balanced draws"')
    p.add_argument('--save', help='store the whole measurement (every table, not the images) as JSON (FidelityResult.save), '
                                  'e.g. nbs/images/demo_fidelity.json, which nbs/17a_condition_fidelity reads')
    a = p.parse_args(argv)
    a.command = ' '.join(['benchmarks/bench_conditioning.py'] + [shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)])
    for k in ('repeats', 'batch', 'steps', 'screen', 'realness_steps'):
        if getattr(a, k) < 1: p.error(f"--{k.replace('_', '-')} must be >= 1")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    try: run(a)
    except CXRDataError as e: raise SystemExit(f'bench_conditioning: refused: {e}')
    print(f'\ntotal {time.perf_counter() - t0:.0f} s')


def run(a):
    real = load_shared_subset(a.data_root or find_data_root())
    gen = load_generator(a.checkpoint, device='cpu')
    if a.screen > 1: gen = ScreenedGenerator(gen, load_screener(a.screener), candidates=a.screen)
    judges = load_judges(a.judges, a.classifier, a.segmenter)
    opts = dict(sampler=a.sampler, steps=a.steps)
    if a.mixed_precision != 'no': opts['mixed_precision'] = a.mixed_precision
    if a.guidance: opts['guidance'] = {} if a.guidance.strip().lower() == 'none' else _parse_scales(a.guidance)
    if a.guidance_mode: opts['guidance_mode'] = a.guidance_mode
    o = gen.check_options('bench_conditioning', **opts)
    print(f"generator: {shareable_path(resolve_path(a.checkpoint))} ({gen.kind}, {gen.image_size} px, conditions "
          f"{list(gen.conditions)}, mask {gen.mask_mode}) | {o['sampler']} {o['steps']} steps | guidance "
          f"{o['guidance'] or 'none'} ({o['guidance_mode']}) | {o['mixed_precision']} | seed {a.seed} | torch threads {torch.get_num_threads()}"
          + (f" | best of {a.screen} by {gen.judges.name}" if a.screen > 1 else ''))
    print(f"judges: {judges.name} ({judges.size} px) | real data: {real.name}, split {a.split!r}")
    t = time.perf_counter()
    req = donor_requests(real, a.split, list(gen.findings), gen.image_size, judges.size)   # what measure would build; kept for realness
    r = measure(gen, real, a.split, judges, repeats=a.repeats, n_per_finding=a.n_per_finding, seed=a.seed, batch=a.batch,
                min_positives=a.min_positives, req=req, progress=_progress(t) if a.progress else None, **opts)
    print(f"{len(r.synthetic)} synthetic images drawn and judged in {time.perf_counter() - t:.0f} s")

    c = r.consistency
    print(f"\nclass consistency (judge AUROC for f; real = donor films at the generator's resolution; native = {judges.size} px)")
    print(f"{'finding':<13} {'synthetic':>6} {'95% CI':>13} {'pos':>4}  {'real':>5} {'95% CI':>13} {'pos':>4} {'native':>6}  "
          f"{'ratio':>5}  {'p(f) syn/real pos':>17}  note")
    for x in c.itertuples():
        print(f"{x.finding:<13} {fmt(x.synthetic_auroc, 3):>9} {ci(x.synthetic_ci):>13} {x.synthetic_positives:>4}  "
              f"{fmt(x.real_auroc, 3):>5} {ci(x.real_ci):>13} {x.real_positives:>4} {fmt(x.native_auroc, 3):>6}  {fmt(x.ratio):>5}  "
              f"{fmt(x.p_synthetic_pos, 3) + ' / ' + fmt(x.p_real_pos, 3):>17}  {'too few to conclude' if x.too_few else ''}")
    ad = r.adherence
    print(f"\nmask adherence (segmenter Dice with the asked-for mask; ceiling = the real donor film, floor = another donor's mask)")
    print(f"{'group':<18} {'donors':>6} {'Dice':>6} {'ceiling':>7} {'native':>6} {'floor':>6} {'ratio':>6} {'floor ratio':>11}  note")
    for x in ad.itertuples():
        print(f"{x.group:<18} {x.donors:>6} {fmt(x.dice, 3):>6} {fmt(x.ceiling, 3):>7} {fmt(x.native_ceiling, 3):>6} "
              f"{fmt(x.floor, 3):>6} {fmt(x.ratio):>6} {fmt(x.floor_ratio):>11}  "
              + ('; '.join(s for s in ['ceiling ~0: not seen on real films' if x.donors and not np.isfinite(x.ratio) else '',
                                      'too few to conclude' if x.too_few else ''] if s)))
    print("\nlesion contrast (inside the mask minus a 3-px ring; synthetic / real) and per-finding coverage")
    cov = r.coverage.set_index('finding')
    for x in r.contrast.itertuples():
        cv = cov.loc[x.finding]
        print(f"{x.finding:<13} images {x.images:>4}  contrast {fmt(getattr(x, 'synthetic_contrast', np.nan), 3):>6} / "
              f"{fmt(getattr(x, 'real_contrast', np.nan), 3):>6} = {fmt(getattr(x, 'ratio', np.nan)):>5}   coverage "
              f"{fmt(cv.get('coverage', np.nan))} ({int(cv.real)} real, {int(cv.synthetic)} synthetic positives)")
    f = r.fidelity
    print(f"\nfidelity against the {f['n_real']} real donor films: FID {f['fid']:.2f}  KID {f['kid']:.4f}  precision "
          f"{f['precision']:.3f}  recall {f['recall']:.3f}  density {f['density']:.3f}  coverage {f['coverage']:.3f}")
    look = measure_realness(a, real, req, r)

    s = r.summary()
    print(f"\ntargets (issue 10): consistency ratio >= {CONSISTENCY_TARGET} for every rare finding; adherence >= "
          f"{ADHERENCE_TARGET} x real ceiling; FID no worse than the issue-9 demo")
    print('  consistency: ' + ' | '.join(f"{x.finding} {fmt(x.ratio)} {verdict(x.ratio, CONSISTENCY_TARGET)}{' *' if x.too_few else ''}"
                                         for x in c.itertuples()))
    print('  adherence:   ' + ' | '.join(f"{x.group} {fmt(x.ratio)} {verdict(x.ratio, ADHERENCE_TARGET)}{' *' if x.too_few else ''}"
                                         for x in ad.itertuples()))
    fid_v = ('no target recorded' if FID_TARGET is None else
             'met' if s['fid'] <= FID_TARGET else f'missed by {s["fid"] - FID_TARGET:.2f}')
    print(f"  FID:         {s['fid']:.2f} vs {fmt(FID_TARGET) if FID_TARGET else 'n/a'}: {fid_v}")
    n_met = int((c.ratio >= CONSISTENCY_TARGET).sum())
    if a.record: record(a, gen, o, judges, real, r, s, look)
    if a.save:
        path = r.save(a.save, command=a.command, checkpoint=shareable_path(resolve_path(a.checkpoint)), kind=gen.kind,
                      model_sha256=gen.model_sha256(), judges=judges.name, data=real.name, split=a.split,
                      donors=len(set(r.donors.tolist())), images=len(r.synthetic), image_ids=list(req.image_ids),
                      date=datetime.date.today().isoformat())
        print(f"stored in {shareable_path(path)}")
    print(f"  summary: consistency {n_met}/{len(c)} findings met; adherence {verdict(s['adherence'], ADHERENCE_TARGET)}; FID {fid_v}"
          + (f"; * too few to conclude: {', '.join(s['too_few'])}" if s['too_few'] else ''))


def control_films(real, split: str, findings, size: int, n: int, seed: int = 0):
    """Up to `n` real films of another split than the reference `split` (the training split; 'val' when the reference is
    'train'), read as the reference films are (`load_masked_images` at `size`): realness's real-vs-real control.
    Returns (images or None when that split has fewer than 8 films, the split's name)."""
    other = 'train' if split != 'train' else 'val'
    ids = real.images.loc[real.images['split'] == other, 'image_id'].tolist()
    if len(ids) < 8: return None, other
    pick = np.random.default_rng(seed).permutation(len(ids))[:n]
    return load_masked_images(real, other, list(findings), size, image_ids=[ids[i] for i in pick])['images'], other


def measure_realness(a, real, req, r) -> dict:
    """`realness` of the synthetic images `r.synthetic` against the real donor films `req.films`, both brought to the
    smaller of their sizes by `to_size` and compared at no more than `REALNESS_PX`; printed as a short block. The
    returned dict adds `realness_px` and `realness_control` (the control's split, or 'none')."""
    t = time.perf_counter()
    common = min(r.synthetic.shape[-1], req.films.shape[-1])
    control, other = control_films(real, a.split, req.findings, req.films.shape[-1], len(r.synthetic), a.seed)
    look = realness(to_size(req.films, common), to_size(r.synthetic, common),
                    control=None if control is None else to_size(control, common),
                    size=min(common, REALNESS_PX), seed=a.seed, steps=a.realness_steps)
    look.update(realness_px=min(common, REALNESS_PX), realness_control=other if control is not None else 'none')
    bands = [k for k in look if k.startswith('band_')]
    n = min(look['n_real'], look['n_synthetic'])
    print(f"\nrealness against the {look['n_real']} real donor films at {look['realness_px']} px (a detector trained from scratch on "
          f"{n} + {n} films, {a.realness_steps} steps, scored out of fold; {time.perf_counter() - t:.0f} s)")
    print(f"  detector AUROC {look['detector_auroc']:.3f} [{look['detector_auroc_low']:.3f}, {look['detector_auroc_high']:.3f}]   "
          + (f"control (real {other} films against the donor films) {look['control_auroc']:.3f}" if control is not None
             else f"control: none (fewer than 8 real {other} films)") + "   (0.5 = cannot tell them apart)")
    print(f"  sharpness ratio {look['sharpness_ratio']:.2f} (median variance of the Laplacian, synthetic / real: 1 = as sharp, below 1 = "
          f"blurred, above 1 = noisier); sharpness alone as the detector (lower = synthetic): AUROC {look['sharpness_auroc']:.3f}")
    print('  spectral power, synthetic / real, per octave band (cycles per image): '
          + ' | '.join(f"{k[5:].replace('_', '-')} {look[k]:.2f}" for k in bands) + f";  spectrum distance {look['spectrum_distance']:.3f}")
    return look


def _progress(t0):
    "A `measure` progress callback printing images drawn, elapsed time and an estimate of the rest."
    def show(done, total):
        dt = time.perf_counter() - t0
        print(f"  drawn {done}/{total} in {dt:.0f} s (about {dt / done * (total - done):.0f} s left)", flush=True)
    return show


def record(a, gen, o, judges, real, r, s, look):
    "Append this run's summary and realness (`look`; its image counts as `realness_n_real`, `realness_n_synthetic`) to the CSV `a.record` (written atomically)."
    import pandas as pd
    from cxr_diffusion_nbs.core import atomic_write
    row = dict(label=a.label, checkpoint=shareable_path(resolve_path(a.checkpoint)), screen=a.screen, sampler=o['sampler'], steps=o['steps'],
               mixed_precision=o['mixed_precision'],
               guidance=json.dumps(o['guidance']), guidance_mode=o['guidance_mode'], judges=judges.size, data=real.name,
               split=a.split, donors=len(set(r.donors.tolist())),
               images=len(r.synthetic), seed=a.seed, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if k != 'too_few'},
               too_few=' '.join(s['too_few']),
               **{(f'realness_{k}' if k.startswith('n_') else k): (round(v, 4) if isinstance(v, float) else v) for k, v in look.items()},
               date=datetime.date.today().isoformat())
    path = resolve_path(a.record)
    prev = pd.read_csv(path) if path.exists() else pd.DataFrame()
    with atomic_write(path) as tmp: pd.concat([prev, pd.DataFrame([row])], ignore_index=True).to_csv(tmp, index=False)
    print(f"recorded in {shareable_path(path)}")


if __name__ == '__main__':
    main()
