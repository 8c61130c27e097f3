"""Does a generator draw what it is asked for? Class consistency, mask adherence and FID on the validation split.

Every real validation image becomes one synthetic request: its finding labels (unknown = 0, a drawn lesion counts
as positive, as in training) and its lesion masks (the union mask for a union-mask model, one per finding for a
per-finding model) are given to the generator (`load_generator`, default the shipped demo model, DPM-Solver++ 20
steps), so the synthetic set and the real set carry the same conditions, donor by donor. Then, per rare finding:

- **class consistency**: the judge classifier trained on real images (`data/models/classifier64` unless
  `--classifier`) scores every synthetic image; its AUROC for "asked for f" against "not asked" (with a DeLong 95%
  interval) sits next to its AUROC for f on the real validation images themselves, and the ratio synthetic/real is
  the consistency ratio. Also the judge's mean probability for f on synthetic positives against real positives.
- **mask adherence**: the lesion segmenter (`data/models/segmenter64` unless `--segmenter`) segments every
  synthetic image whose donor has a complete lesion outline (`adherence.select_training_images`: role 'lesion');
  Dice with the mask it was conditioned on, against the **ceiling** (the segmenter on the real donor image against
  its own mask) and the **floor** (the synthetic image against another donor's mask, `adherence.derangement`).
  Dice/ceiling is the adherence ratio. Per-finding rows average over the donors positive for that finding (their
  union masks include co-occurring lesions); synthetic repeats of a donor are averaged first.
- **FID** (and KID, precision, recall, density, coverage) of the synthetic set against the real validation images in
  the judge's features (`metrics.compare_sets`), next to a real training sample of the same size against the same
  validation images (the FID two real samples of this size reach) and, when `--checkpoint` is not the demo, the demo
  model drawn with the same requests (the "no worse than today's demo" target).

Targets (issue 10): consistency ratio >= 0.9 for every rare finding; adherence >= 0.8 of the real ceiling; FID no
worse than the demo's. A comparison resting on fewer than `--min-positives` (20) real positives or lesion images is
reported, and flagged "too few to conclude". Measured in one run, nothing stored; numbers move with `--seed`.
With `--repeats` or `--n-per-finding` several synthetic images share one donor's conditions; their DeLong interval
treats them as independent, and the number of distinct donors (= real positives) is what limits the conclusion.
Cost with the defaults on the shared subset (169 validation images, 64 px demo, fp32, 2 CPU cores): about 1.5-2
minutes, nearly all of it sampling (about 0.5 s per image: 20 steps of about 0.026 s).

    .venv/bin/python benchmarks/bench_conditioning.py                          # demo model, all validation images
    .venv/bin/python benchmarks/bench_conditioning.py --guidance labels=3,mask=1 --repeats 3
    .venv/bin/python benchmarks/bench_conditioning.py --checkpoint runs/cpu64 --n-per-finding 60
"""
import argparse, math, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_diffusion_nbs import load_generator
from cxr_diffusion_nbs.core import RARE_FINDINGS, CXRDataError, find_data_root, resolve_path, shareable_path
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.cohort import DonorPool, image_seed
from cxr_diffusion_nbs.classifier import shipped_classifier, load_classifier, predict_proba
from cxr_diffusion_nbs.adherence import (select_training_images, load_masked_images, consistency_table, mask_adherence,
                                         derangement, shipped_segmenter, load_segmenter)
from cxr_diffusion_nbs.metrics import feature_extractor, extract_features, compare_sets
from cxr_diffusion_nbs.downstream import delong_ci
from cxr_diffusion_nbs.sampling import SAMPLERS, GUIDANCE_MODES, _parse_scales

ROOT = Path(__file__).resolve().parents[1]
DEMO = 'data/models/cpu64_demo'
CONSISTENCY_TARGET, ADHERENCE_TARGET = 0.9, 0.8


def plan_requests(labels: np.ndarray, cols: list, repeats: int, n_per_finding: int) -> np.ndarray:
    """Donor index of every synthetic request: each donor `repeats` times, then, per finding (column of `labels` in
    `cols`) with fewer than `n_per_finding` positive requests, its positive donors again in turn until it has that many."""
    donors = list(np.tile(np.arange(len(labels)), repeats))
    for k in cols:
        pos = np.flatnonzero(labels[:, k] == 1)
        have = int((labels[donors, k] == 1).sum())
        for j in range(max(0, n_per_finding - have) if len(pos) else 0): donors.append(int(pos[j % len(pos)]))
    return np.array(donors, dtype=int)


def draw(gen, labels: np.ndarray, masks, donors: np.ndarray, seeds: list, opts: dict, batch: int) -> torch.Tensor:
    "Images (n, 1, S, S) in [-1, 1] for the requests `donors` (their labels and masks), one seed per image, in batches."
    out = []
    for b in range(0, len(donors), batch):
        d = donors[b:b + batch]
        out.append(gen.generate(labels=torch.from_numpy(labels[d]).float(), masks=None if masks is None else masks[d],
                                seed=seeds[b:b + batch], **opts))
    return torch.cat(out)


def auroc_ci(y: np.ndarray, p: np.ndarray) -> str:
    "'[lo, hi]' DeLong 95% interval, or '' when there are too few positives or negatives."
    y = np.asarray(y, float)
    if (y == 1).sum() < 2 or (y == 0).sum() < 2: return ''
    ci = delong_ci(y, p)
    return f"[{ci['lo']:.2f}, {ci['hi']:.2f}]"


def verdict(value: float, target: float) -> str:
    if value is None or not np.isfinite(value): return '(no reference to compare with)'
    return 'met' if value >= target else f'missed by {target - value:.2f}'


def fmt(x, d=3) -> str: return 'n/a' if x is None or not np.isfinite(x) else f'{x:.{d}f}'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default=DEMO, help='generator to measure (any folder load_generator opens; default: the demo)')
    p.add_argument('--classifier', help='judge classifier folder (save_classifier); default: data/models/classifier64')
    p.add_argument('--segmenter', help='lesion segmenter folder (save_segmenter); default: data/models/segmenter64')
    p.add_argument('--data-root', help='real data (default: core.find_data_root(), the shared NIH subset if present)')
    p.add_argument('--split', default='val', help='real split whose images are the donors and the reference (default: val)')
    p.add_argument('--repeats', type=int, default=1, help='synthetic images per real donor (default 1)')
    p.add_argument('--n-per-finding', type=int, default=0,
                   help="top up every rare finding to at least this many synthetic positives by repeating its donors (default 0: off)")
    p.add_argument('--sampler', default='dpmpp', choices=SAMPLERS)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--guidance', default='', help='per-condition scales as cxr-sample takes them, e.g. labels=1,mask=1 (default: none)')
    p.add_argument('--guidance-mode', default='compositional', choices=GUIDANCE_MODES)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--bf16', action='store_true', help='sample with bf16 autocast (default fp32)')
    p.add_argument('--no-fid', action='store_true', help='skip FID (and the baseline draw)')
    p.add_argument('--baseline', default=DEMO, help="generator the FID target compares with (default: the demo; 'none': skip)")
    p.add_argument('--min-positives', type=int, default=20, help='fewer real positives / lesion images: "too few to conclude"')
    p.add_argument('--threads', type=int, default=2)
    a = p.parse_args(argv)
    for k in ('repeats', 'batch', 'steps'):
        if getattr(a, k) < 1: p.error(f'--{k.replace("_", "-")} must be >= 1')
    if a.n_per_finding < 0: p.error('--n-per-finding must be >= 0')
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    try: run(a)
    except CXRDataError as e: raise SystemExit(f'bench_conditioning: refused: {e}')
    print(f'\ntotal {time.perf_counter() - t_start:.0f} s')


def run(a):
    # ---- data, generator, judges ----
    real = load_shared_subset(a.data_root or find_data_root())
    gen = load_generator(a.checkpoint, device='cpu')
    S, gf = gen.image_size, list(gen.findings)
    rare = [f for f in RARE_FINDINGS if f in gf]
    if not rare: raise SystemExit(f'bench_conditioning: the generator models none of the rare findings {RARE_FINDINGS} (it has {gf})')
    clf, clf_cfg = load_classifier(a.classifier, 'cpu') if a.classifier else shipped_classifier('cpu')
    seg, seg_cfg = load_segmenter(a.segmenter, 'cpu') if a.segmenter else shipped_segmenter('cpu')
    for name, size in (('classifier', clf_cfg.image_size), ('segmenter', seg_cfg.image_size)):
        if size != S: raise SystemExit(f'bench_conditioning: the {name} works at {size} px, the generator draws {S} px')
    miss = [f for f in rare if f not in clf_cfg.findings]
    if miss: raise SystemExit(f'bench_conditioning: the classifier has no output for {miss[0]} (it has {list(clf_cfg.findings)})')

    pool = DonorPool(real, gf, S, split=a.split, dilate_px=0)     # labels: unknown = 0, an outline counts as positive
    ids = list(pool.ds.images['image_id'])
    labels = pool.labels.astype(np.float32)                       # (N, F_gen)
    per = torch.stack([pool.masks(i) for i in range(len(ids))])    # (N, F_gen, S, S)
    union = per.amax(1, keepdim=True)
    cond_masks = {None: None, 'union': union, 'per_finding': per}[gen.mask_mode]
    real_images = load_masked_images(real, a.split, gf, S, image_ids=ids)['images']
    sel = select_training_images(real, gf, a.split, negatives=0)
    lesion = np.isin(ids, sel.loc[sel['role'] == 'lesion', 'image_id'])   # union mask complete (every positive outlined)

    gk = [gf.index(f) for f in rare]
    donors = plan_requests(labels, gk, a.repeats, a.n_per_finding)
    seeds = [image_seed(a.seed, k) for k in range(len(donors))]
    opts = dict(sampler=a.sampler, steps=a.steps, guidance=_parse_scales(a.guidance), guidance_mode=a.guidance_mode,
                mixed_precision='bf16' if a.bf16 else 'no')
    gen.check_options('bench_conditioning', **opts)

    print(f"generator: {shareable_path(resolve_path(a.checkpoint))} ({gen.kind}, {S} px, conditions {list(gen.conditions)}, "
          f"mask {gen.mask_mode}) | {a.sampler} {a.steps} steps | guidance {opts['guidance'] or 'none'} ({a.guidance_mode}) | "
          f"{'bf16' if a.bf16 else 'fp32'} | seed {a.seed} | torch threads {torch.get_num_threads()}")
    print(f"real data: {real.name}, split {a.split!r}: {len(ids)} images = donors ({int(lesion.sum())} with a complete lesion "
          f"outline); synthetic requests: {len(donors)} ({a.repeats} per donor"
          f"{f', topped up to >= {a.n_per_finding} positives per finding' if a.n_per_finding else ''})")
    print(f"judges: classifier {a.classifier or 'data/models/classifier64'}, segmenter {a.segmenter or 'data/models/segmenter64'}")

    t0 = time.perf_counter()
    syn = draw(gen, labels, cond_masks, donors, seeds, opts, a.batch)
    t_gen = time.perf_counter() - t0
    print(f"sampled {len(syn)} images in {t_gen:.1f} s ({t_gen / len(syn):.3f} s/image, batch {a.batch})")

    # ---- class consistency ----
    cols = [list(clf_cfg.findings).index(f) for f in rare]
    p_real, p_syn = predict_proba(clf, real_images)[:, cols], predict_proba(clf, syn)[:, cols]
    y_real, y_syn = labels[:, gk], labels[donors][:, gk]
    t_real = consistency_table(p_real, y_real, rare).set_index('finding')
    t_syn = consistency_table(p_syn, y_syn, rare).set_index('finding')
    print(f"\nclass consistency: judge AUROC for f, synthetic (asked for f vs not) and real {a.split} (label f vs not), "
          f"DeLong 95% CI; mean p(f) on positives")
    print(f"{'finding':<13} {'synthetic AUROC':>21} {'pos/images':>10}   {'real AUROC':>21} {'pos/images':>10}  "
          f"{'ratio':>5}  {'mean p(f) syn/real pos':>22}  note")
    cons = {}
    for j, f in enumerate(rare):
        s, r = t_syn.loc[f], t_real.loc[f]
        s_pos, s_n, r_pos, r_n = int(s.positives), int(s.positives + s.negatives), int(r.positives), int(r.positives + r.negatives)
        ratio = s.auroc / r.auroc if np.isfinite(s.auroc) and np.isfinite(r.auroc) else np.nan
        few = r_pos < a.min_positives
        cons[f] = (ratio, few, r_pos)
        mp = (f"{s.mean_prob_pos:.3f} / {r.mean_prob_pos:.3f} (x{s.mean_prob_pos / r.mean_prob_pos:.2f})"
              if r_pos and s_pos else 'n/a')
        print(f"{f:<13} {fmt(s.auroc):>6} {auroc_ci(y_syn[:, j], p_syn[:, j]):>14} {f'{s_pos}/{s_n}':>10}   "
              f"{fmt(r.auroc):>6} {auroc_ci(y_real[:, j], p_real[:, j]):>14} {f'{r_pos}/{r_n}':>10}  "
              f"{fmt(ratio, 2):>5}  {mp:>22}  {f'too few to conclude ({r_pos} real positives)' if few else ''}")

    # ---- mask adherence ----
    L = np.flatnonzero(lesion)
    adh = {}
    if len(L) >= 2:
        req = np.flatnonzero(lesion[donors])                        # synthetic requests of lesion donors
        other = dict(zip(L, L[derangement(len(L), seed=a.seed)]))   # each donor's mask goes to another image
        ceiling = pd.Series(mask_adherence(seg, real_images[L], union[L]).dice.to_numpy(), index=L)
        d_syn = mask_adherence(seg, syn[req], union[donors[req]]).dice.to_numpy()
        d_floor = mask_adherence(seg, syn[req], union[[other[d] for d in donors[req]]]).dice.to_numpy()
        dsyn = pd.Series(d_syn).groupby(donors[req]).mean()         # repeats of a donor averaged first
        dfloor = pd.Series(d_floor).groupby(donors[req]).mean()
        print(f"\nmask adherence: segmenter Dice against the mask asked for, on the {len(L)} {a.split} donors with a complete "
              f"lesion outline (per finding: the donors positive for it)")
        print(f"{'finding':<20} {'donors':>6} {'Dice syn':>9} {'ceiling':>8} {'floor':>7} {'Dice/ceiling':>13} {'floor/ceiling':>14}  note")
        groups = [('all lesion images', L)] + [(f, L[labels[L, gf.index(f)] == 1]) for f in rare]
        for name, D in groups:
            if not len(D):
                print(f"{name:<20} {0:>6}  no {a.split} image of it has a complete outline"); adh[name] = (np.nan, True, 0, np.nan); continue
            c, s_, fl = ceiling[D].mean(), dsyn[D].mean(), dfloor[D].mean()
            ok = c >= 0.05
            ratio, fratio = (s_ / c, fl / c) if ok else (np.nan, np.nan)
            few = len(D) < a.min_positives
            note = '; '.join(x for x in ['' if ok else 'ceiling ~0: the segmenter does not see it on real images',
                                         f'too few to conclude ({len(D)} images)' if few else ''] if x)
            adh[name] = (ratio, few, len(D), c)
            print(f"{name:<20} {len(D):>6} {s_:>9.3f} {c:>8.3f} {fl:>7.3f} {fmt(ratio, 2):>13} {fmt(fratio, 2):>14}  {note}")
    else:
        print(f"\nmask adherence: fewer than 2 {a.split} images with a complete lesion outline: not measured")

    # ---- FID ----
    fid = base_fid = None
    if not a.no_fid:
        ext = feature_extractor(a.classifier, device='cpu')          # None: the shipped classifier
        f_real, f_syn = extract_features(ext, real_images), extract_features(ext, syn)
        rows = [('synthetic', compare_sets(f_real, f_syn, seed=a.seed))]
        fid = rows[0][1]['fid']
        train_ids = list(real.images.loc[real.images['split'] == 'train', 'image_id'])
        if len(train_ids) >= 6 and a.split != 'train':
            pick = sorted(np.random.default_rng(a.seed).choice(len(train_ids), min(len(syn), len(train_ids)), replace=False))
            tr = load_masked_images(real, 'train', gf, S, image_ids=[train_ids[i] for i in pick])['images']
            rows.append(('real train sample', compare_sets(f_real, extract_features(ext, tr), seed=a.seed)))
        note = ''
        if a.baseline.lower() != 'none':
            if resolve_path(a.baseline).resolve() == resolve_path(a.checkpoint).resolve(): note = ' (the generator is the FID baseline itself)'
            else:
                try:
                    bg = load_generator(a.baseline, device='cpu')
                    if list(bg.findings) != gf or bg.mask_mode != gen.mask_mode or bg.image_size != S:
                        raise CXRDataError(a.baseline, 'conditions', 'takes other findings, masks or size than the generator')
                    bg.check_options('bench_conditioning --baseline', **opts)
                    bsyn = draw(bg, labels, {None: None, 'union': union, 'per_finding': per}[bg.mask_mode], donors, seeds, opts, a.batch)
                    rows.append((f'baseline {a.baseline}', compare_sets(f_real, extract_features(ext, bsyn), seed=a.seed)))
                    base_fid = rows[-1][1]['fid']
                except CXRDataError as e: note = f' (baseline not drawn: {e})'
        print(f"\nfidelity against the {len(f_real)} real {a.split} images, in the judge classifier's features{note}")
        print(f"{'set':<34} {'images':>6} {'FID':>7} {'KID':>8} {'precision':>9} {'recall':>7} {'density':>7} {'coverage':>8}")
        for name, r in rows:
            print(f"{name:<34} {r['n_synthetic']:>6} {r['fid']:>7.2f} {r['kid']:>8.4f} {r['precision']:>9.3f} {r['recall']:>7.3f} "
                  f"{r['density']:>7.3f} {r['coverage']:>8.3f}")

    # ---- summary ----
    print(f"\ntargets (issue 10): consistency ratio >= {CONSISTENCY_TARGET} for every rare finding; adherence Dice >= "
          f"{ADHERENCE_TARGET} x real ceiling; FID no worse than the demo's")
    star = lambda few: ' *' if few else ''
    print('  consistency ratio:  ' + ' | '.join(f"{f} {fmt(r, 2)} {verdict(r, CONSISTENCY_TARGET)}{star(few)}"
                                                 for f, (r, few, _) in cons.items()))
    n_met = sum(np.isfinite(r) and r >= CONSISTENCY_TARGET for r, _, _ in cons.values())
    if adh:
        print('  adherence ratio:    ' + ' | '.join(f"{n} {fmt(r, 2)} {verdict(r, ADHERENCE_TARGET)}{star(few)}"
                                                    for n, (r, few, _, _) in adh.items()))
    if fid is not None:
        if base_fid is not None: fv = f"{fid:.2f} vs baseline {base_fid:.2f}: {'met' if fid <= base_fid else f'missed by {fid - base_fid:.2f}'}"
        else: fv = f"{fid:.2f} (no other generator drawn to compare with)"
        print(f"  FID:                {fv}")
    few_c = [f for f, (_, few, _) in cons.items() if few]
    few_a = [n for n, (_, few, _, _) in adh.items() if few]
    print(f"  consistency target: {'met' if n_met == len(cons) else 'missed'} ({n_met} of {len(cons)} findings at >= {CONSISTENCY_TARGET})"
          + (f"; adherence target (all lesion images): {verdict(adh['all lesion images'][0], ADHERENCE_TARGET)}" if 'all lesion images' in adh else ''))
    if few_c or few_a:
        print(f"  * too few to conclude (< {a.min_positives} real positives / lesion images): "
              f"{', '.join(few_c) or 'none'} for consistency; {', '.join(few_a) or 'none'} for adherence")


if __name__ == '__main__':
    main()
