"""Readable figures: every figure function of the package that the notebooks, the README's stored images or the
pipeline's run folder show is drawn once on small made-up inputs, and fails if two pieces of text overlap (titles,
axis and tick labels, figure titles, annotations), if a legend covers text, or if a figure-level title or legend
runs into a panel. Overlaps are measured as matplotlib lays the figure out: `fig.canvas.draw()`, then the window
extent of every visible text and legend, in display pixels."""
import itertools
import numpy as np, pandas as pd, pytest, torch
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from cxr_diffusion_nbs.core import project_root

SLACK = 1.0          # pixels: boxes that only touch are not an overlap

def _ticks(axis):
    "The tick labels matplotlib draws on `axis` (inside the view limits, visible, not empty)."
    if not axis.get_visible(): return []                                  # e.g. the shared x axis of a twinx panel
    return [l for t in axis._update_ticks() for l in (t.label1, t.label2) if l.get_visible() and l.get_text().strip()]

def layout(fig):
    "Draw `fig`; return its texts [(what, bbox)], its legends [(what, bbox)] and its panels [(what, bbox)], in display pixels."
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts, legends, panels = [], [], []
    def add(what, t):
        if t is not None and t.get_visible() and t.get_text().strip(): texts.append((what, t.get_window_extent(r)))
    if fig._suptitle is not None: add('suptitle', fig._suptitle)
    for i, t in enumerate(fig.texts):
        if t is not fig._suptitle: add(f'figure text {i}', t)
    for i, lg in enumerate(fig.legends): legends.append((f'figure legend {i}', lg.get_window_extent(r)))
    for a, ax in enumerate(fig.axes):
        if not ax.get_visible(): continue
        panels.append((f'axes {a}', ax.get_window_extent(r)))
        for side, t in (('title', ax.title), ('left title', ax._left_title), ('right title', ax._right_title)): add(f'axes {a} {side}', t)
        if ax.axison:                                                      # ax.axis('off') draws no ticks or labels
            add(f'axes {a} x label', ax.xaxis.label); add(f'axes {a} y label', ax.yaxis.label)
            for t in _ticks(ax.xaxis): add(f'axes {a} x tick {t.get_text()!r}', t)
            for t in _ticks(ax.yaxis): add(f'axes {a} y tick {t.get_text()!r}', t)
        for i, t in enumerate(ax.texts): add(f'axes {a} text {t.get_text()!r}', t)
        if ax.get_legend() is not None: legends.append((f'axes {a} legend', ax.get_legend().get_window_extent(r)))
    return texts, legends, panels

def _hit(a, b):
    return min(a.x1, b.x1) - max(a.x0, b.x0) > SLACK and min(a.y1, b.y1) - max(a.y0, b.y0) > SLACK

def overlaps(fig) -> list:
    "Every pair that collides: text on text, a legend on text, a figure-level title, text or legend on a panel."
    texts, legends, panels = layout(fig)
    bad = [(a, b) for (a, ba), (b, bb) in itertools.combinations(texts, 2) if _hit(ba, bb)]
    bad += [(l, t) for l, bl in legends for t, bt in texts if _hit(bl, bt)]
    bad += [(l, m) for (l, bl), (m, bm) in itertools.combinations(legends, 2) if _hit(bl, bm)]
    top = [(w, b) for w, b in texts if w == 'suptitle' or w.startswith('figure text')] + [x for x in legends if x[0].startswith('figure')]
    bad += [(w, p) for w, b in top for p, bp in panels if _hit(b, bp)]
    return bad

def check(fig):
    try: assert not overlaps(fig), overlaps(fig)[:6]
    finally: plt.close(fig)

# ---------------------------------------------------------------- the checker itself

def test_the_checker_sees_what_a_reader_would():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(range(40)); ax.set_xticks(range(40), [f'label {i}' for i in range(40)])        # crowded tick labels
    assert any('x tick' in a and 'x tick' in b for a, b in overlaps(fig)); plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.plot([0, 1], label='a line'); ax.set_xlabel('synthetic images per finding')
    fig.tight_layout(); fig.legend(loc='lower center', bbox_to_anchor=(.5, 0))
    assert ('figure legend 0', 'axes 0 x label') in overlaps(fig); plt.close(fig)          # the rarity figure's fault
    fig, axs = plt.subplots(2, 2, figsize=(3, 3))
    for ax in axs.flat: ax.imshow(np.zeros((8, 8))); ax.set_xticks([]); ax.set_yticks([])
    fig.suptitle('a long title over the panels'); fig.tight_layout(pad=.2); fig.subplots_adjust(top=.99)
    assert ('suptitle', 'axes 0') in overlaps(fig); plt.close(fig)                           # the GAN grid's fault
    fig, ax = plt.subplots(figsize=(4, 3)); ax.plot([0, 1]); ax.set_title('fine'); ax.set_xlabel('x'); fig.tight_layout()
    assert overlaps(fig) == []; plt.close(fig)

# ---------------------------------------------------------------- the package's figures

def test_plot_loss():
    from cxr_diffusion_nbs.training import plot_loss
    steps = np.arange(1, 200, 10)
    check(plot_loss(pd.DataFrame(dict(step=steps, loss=1 / steps, loss_lesion=.5 / steps, loss_mse=.8 / steps))))

def test_plot_reader_accuracy():
    from cxr_diffusion_nbs.turing import plot_reader_accuracy, score_readers, confusion_table
    key = pd.DataFrame(dict(case_id=[f'case_{i:03d}' for i in range(1, 13)], truth=['real', 'synthetic'] * 6))
    rng = np.random.default_rng(0)
    forms = pd.concat([pd.DataFrame(dict(reader=r, case_id=key.case_id, answer=rng.choice(['real', 'synthetic'], 12)))
                       for r in ('reader_A', 'reader_B', 'reader_C')], ignore_index=True)
    check(plot_reader_accuracy(score_readers(forms, key), confusion_table(forms, key)))
    check(plot_reader_accuracy(score_readers(forms, key)))

def rarity_table(findings=('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly'), ks=(20, 50),
                 arms=('augment', 'negatives', 'pretrain', 'screened', 'unconditional', 'weighted')):
    "A study table of the full study's shape (two k, four n, six arms besides mix), numbers made up."
    rng, rows = np.random.default_rng(0), []
    for f in findings:
        for k in ks:
            rows.append(dict(k=k, arm='real-only', n=0, finding=f))
            rows += [dict(k=k, arm='mix', n=n, finding=f) for n in (50, 100, 200, 400)]
            rows += [dict(k=k, arm=a, n=200, finding=f) for a in arms]
    t = pd.DataFrame(rows).assign(eval_set='test', test_pos=30, auroc=lambda d: rng.uniform(.55, .8, len(d)))
    return t.assign(auroc_lo=t.auroc - .08, auroc_hi=t.auroc + .08)

def test_rarity_study_figure():
    from cxr_diffusion_nbs.rarity import study_figure
    check(study_figure(rarity_table()))
    check(study_figure(rarity_table(ks=(20,), arms=('augment', 'unconditional'))))        # the pipeline's small study
    stored = pd.read_csv(project_root()/'nbs'/'images'/'rarity_table.csv', keep_default_na=False)
    check(study_figure(stored))                                                         # nbs/images/rarity_study.png

def test_rarity_worth_figure():
    from cxr_diffusion_nbs.rarity import worth_figure, worth_table
    check(worth_figure(worth_table(rarity_table(ks=(5, 10, 20, 50, 200)))))

def test_gan_sample_grid():
    from cxr_diffusion_nbs.sampling import load_generator
    from cxr_diffusion_nbs.gan import sample_grid
    gan = load_generator(project_root()/'data'/'models'/'gan64', device='cpu')
    check(sample_grid(gan, n=8, seed=0, title='data/models/gan64: one row per finding, the same 8 seeds in every row'))

def test_training_sample_grid_figure():
    from cxr_diffusion_nbs.training import sample_grid_figure
    items = [dict(image=torch.zeros(1, 16, 16), mask=torch.zeros(1, 16, 16)) for _ in range(3)]
    check(sample_grid_figure(torch.zeros(12, 1, 16, 16), items, ['no finding', 'nodule', 'pleural effusion'], 4,
                             title='step 1000: the same seeds in every row'))

def test_pipeline_figures():
    "embedding.png and closest_pairs.png of a run folder (rarity.png above)."
    from cxr_diffusion_nbs.metrics import embedding_figure
    from cxr_diffusion_nbs.memorisation import closest_pairs_figure
    rng = np.random.default_rng(0)
    findings = ('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly')
    check(embedding_figure(rng.normal(size=(60, 8)), rng.normal(size=(30, 8)), rng.integers(0, 2, (60, 5)),
                           rng.integers(0, 2, (30, 5)), findings, method='pca'))
    table = pd.DataFrame(dict(nn_index=rng.integers(0, 10, 8), nn_distance=rng.uniform(0, 1, 8), ssim_index=rng.integers(0, 10, 8),
                              ssim=rng.uniform(0, 1, 8)))
    check(closest_pairs_figure(torch.zeros(8, 1, 16, 16), torch.zeros(10, 1, 16, 16), table, n=6,
                               flags=np.r_[True, np.zeros(7, bool)]))

# ---------------------------------------------------------------- the other lessons' figure functions
RARE = ('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly')

def test_curve_figure():
    from cxr_diffusion_nbs.condition_fidelity import curve_figure
    d = pd.read_csv(project_root()/'nbs'/'images'/'guidance_curve.csv').drop(columns=['model', 'split', 'donors'])
    check(curve_figure(d))

def test_prevalence_figure():
    from cxr_diffusion_nbs.dataset import prevalence_figure
    rng = np.random.default_rng(0)
    im = pd.DataFrame(rng.integers(0, 2, (50, 5)), columns=list(RARE)).assign(patient_id=np.arange(50) % 20, split='train')
    check(prevalence_figure(im, RARE))

def test_ct_windows_figure():
    from cxr_diffusion_nbs.modalities import ct_windows_figure
    check(ct_windows_figure(np.linspace(-1000, 1000, 64 * 64).reshape(64, 64), title='a phantom slice'))

def test_levels_figure():
    from cxr_diffusion_nbs.restoration import levels_figure
    check(levels_figure(np.random.default_rng(0).uniform(0, 1, (64, 64))))

def test_restoration_figure():
    from cxr_diffusion_nbs.restoration import restoration_figure
    g = np.random.default_rng(0)
    c = g.uniform(0, 1, (64, 64)); check(restoration_figure(c, c * .9, {'median': c * .95, 'diffusion': c}, title='restored'))

def test_before_after_figure():
    from cxr_diffusion_nbs.inpainting import before_after_figure
    x = torch.zeros(2, 1, 32, 32); m = torch.zeros(2, 1, 32, 32); m[:, :, 8:16, 8:16] = 1
    check(before_after_figure(x, x, m, titles=['nodule', 'mass']))

def test_trajectory_figure():
    from cxr_diffusion_nbs.sampling import SampleResult, trajectory_figure
    r = SampleResult(torch.zeros(1, 1, 16, 16), [0], 'ddim', 6)
    r.timesteps = list(range(900, -1, -150)); r.x_t = [torch.zeros(1, 1, 16, 16)] * 7; r.x0 = [torch.zeros(1, 1, 16, 16)] * 7
    check(trajectory_figure(r))

def test_dataset_figures():
    "The first lessons' figures, on the bundled sample: examples per finding (masks and report text) and one film browsed."
    from cxr_diffusion_nbs.core import sample_data_root
    from cxr_diffusion_nbs.manifest import load_shared_subset
    from cxr_diffusion_nbs.dataset import CXRDataset, examples_grid, browse_figure
    ds = CXRDataset(load_shared_subset(sample_data_root()), size=64)
    check(examples_grid(ds, ['nodule', 'effusion'], n=3))
    check(browse_figure(ds, 0))
