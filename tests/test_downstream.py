"""Downstream utility: the scikit-learn metrics against their definitions, the vectorised bootstrap statistics against
scikit-learn, DeLong against a brute-force implementation of its definition,
bootstrap determinism and coverage, the rarity cap, refusals before training, and one tiny end-to-end experiment."""
import dataclasses, math
import numpy as np, pandas as pd, pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, average_precision_score, roc_curve
from cxr_diffusion_nbs.core import sample_data_root, PatientLeakageError, CXRDataError
from cxr_diffusion_nbs.manifest import load_shared_subset, Manifest, empty_annotations, ManifestError
from cxr_diffusion_nbs.classifier import ClassifierConfig
from cxr_diffusion_nbs.downstream import (DownstreamError, auroc, average_precision, sensitivity, specificity,
                                          youden_threshold, binary_metrics, bootstrap_ci, delong_test, delong_cov,
                                          delong_ci, paired_bootstrap_auroc_diff, hanley_mcneil_se, auroc_test_size,
                                          simulate_rarity, resized_copy, downstream_experiment, summarise,
                                          utility_figure, auroc_rows, _ap_rows)

FINDINGS = ('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly')

# ---------------------------------------------------------------- an independent DeLong, from the definition
def delong_bruteforce(y, p1, p2):
    "Structural components by explicit pairwise comparison (ties 1/2), their covariance, z and the normal p-value."
    y = np.asarray(y, bool)
    comps = []
    for p in (np.asarray(p1, float), np.asarray(p2, float)):
        pos, neg = p[y], p[~y]
        psi = np.zeros((len(pos), len(neg)))
        for i, a in enumerate(pos):
            for j, b in enumerate(neg):
                psi[i, j] = 1. if a > b else (.5 if a == b else 0.)
        comps.append((psi.mean(1), psi.mean(0), psi.mean()))
    m, n = len(comps[0][0]), len(comps[0][1])
    S = np.zeros((2, 2))
    for r in range(2):
        for s in range(2):
            s10 = sum((comps[r][0][i] - comps[r][2]) * (comps[s][0][i] - comps[s][2]) for i in range(m)) / (m - 1)
            s01 = sum((comps[r][1][j] - comps[r][2]) * (comps[s][1][j] - comps[s][2]) for j in range(n)) / (n - 1)
            S[r, s] = s10 / m + s01 / n
    a1, a2 = comps[0][2], comps[1][2]
    z = (a1 - a2) / math.sqrt(S[0, 0] + S[1, 1] - 2 * S[0, 1])
    return a1, a2, z, 2 * (1 - stats.norm.cdf(abs(z))), S

def tied_case(seed, n=60, prev=.3):
    g = np.random.default_rng(seed)
    y = g.random(n) < prev; y[:2] = [True, False]
    common = g.normal(size=n)                              # correlated models: shared image difficulty
    p1 = np.round(y * 1.0 + common + .5 * g.normal(size=n), 1)
    p2 = np.round(y * .5 + common + .7 * g.normal(size=n), 1)
    return y, p1, p2

@pytest.mark.parametrize('seed', range(12))
def test_delong_matches_bruteforce_with_ties(seed):
    y, p1, p2 = tied_case(seed)
    assert len(np.unique(p1)) < len(p1)                   # there are ties
    a1, a2, z, pv, S = delong_bruteforce(y, p1, p2)
    r = delong_test(y, p1, p2)
    np.testing.assert_allclose([r.auc1, r.auc2, r.z, r.p_value], [a1, a2, z, pv], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.cov, S, rtol=1e-9, atol=1e-14)
    auc1, auc2, z2, p2v, cov = r                           # unpacks as (auc1, auc2, z, p, cov)
    assert (auc1, z2) == (r.auc1, r.z)
    assert r.auc1 == pytest.approx(roc_auc_score(y, p1)) and r.auc2 == pytest.approx(roc_auc_score(y, p2))
    assert r.ci_lo < r.diff < r.ci_hi

def test_delong_edge_cases():
    y, p1, p2 = tied_case(0)
    assert delong_test(y, p1, p1).p_value == 1 and delong_test(y, p1, p1).z == 0
    r12, r21 = delong_test(y, p1, p2), delong_test(y, p2, p1)
    assert r12.z == pytest.approx(-r21.z) and r12.p_value == pytest.approx(r21.p_value)
    with pytest.raises(ValueError): delong_test([1, 0, 0, 0], [.1, .2, .3, .4], [.4, .3, .2, .1])   # one positive
    with pytest.raises(ValueError): delong_test([1, 0, np.nan, 1], [.1, .2, .3, .4], [.4, .3, .2, .1])  # unknown label
    # a single AUROC's DeLong variance, three models at once
    aucs, S = delong_cov(y, np.vstack([p1, p2, -p1]))
    assert S.shape == (3, 3) and aucs[2] == pytest.approx(1 - aucs[0]) and S[0, 2] == pytest.approx(-S[0, 0])
    ci = delong_ci(y, p1)
    assert ci['lo'] < ci['estimate'] < ci['hi']

def test_delong_size_under_null_and_agreement_with_paired_bootstrap():
    "Under H0 (two equally good correlated models) p < 0.05 about 5% of the time; the paired bootstrap agrees."
    rej, n = 0, 300
    for s in range(n):
        g = np.random.default_rng(1000 + s)
        y = np.r_[np.ones(30), np.zeros(90)].astype(bool)
        common = g.normal(size=120)
        p1, p2 = y + common + g.normal(size=120), y + common + g.normal(size=120)
        rej += delong_test(y, p1, p2).p_value < .05
    assert .02 <= rej / n <= .09
    g = np.random.default_rng(5)
    y = np.r_[np.ones(60), np.zeros(240)].astype(bool)
    common = g.normal(size=300)
    p1, p2 = 1.2 * y + common + g.normal(size=300), .8 * y + common + g.normal(size=300)
    d, b = delong_test(y, p1, p2), paired_bootstrap_auroc_diff(y, p1, p2, n_boot=2000, seed=0)
    assert b['diff'] == pytest.approx(d.diff)
    assert abs(b['lo'] - d.ci_lo) < .02 and abs(b['hi'] - d.ci_hi) < .02
    assert abs(b['p_value'] - d.p_value) < .03

# ---------------------------------------------------------------- metrics against scikit-learn
@pytest.mark.parametrize('seed', range(15))
def test_metrics_match_definitions_and_sklearn(seed):
    "The exported metrics call scikit-learn; here they meet the definitions written out independently."
    y, p, _ = tied_case(seed, n=80, prev=.2)
    d = p[y][:, None] - p[~y][None, :]
    assert auroc(y, p) == pytest.approx(((d > 0) + .5 * (d == 0)).mean(), abs=1e-12)          # pairs, ties 1/2
    thr = np.unique(p)[::-1]                                                              # each distinct score a threshold
    prec, rec = [y[p >= t].mean() for t in thr], [y[p >= t].sum() / y.sum() for t in thr]
    assert average_precision(y, p) == pytest.approx(np.sum(np.diff(np.r_[0., rec]) * prec), abs=1e-12)
    t = youden_threshold(y, p)
    j = {u: np.mean(p[y] >= u) + np.mean(p[~y] < u) - 1 for u in thr}
    assert t == max(j, key=lambda u: (round(j[u], 12), u))                               # best J, the highest on ties
    fpr, tpr, rthr = roc_curve(y, p)
    assert (sensitivity(y, p, t) - (1 - specificity(y, p, t))) == pytest.approx((tpr - fpr).max()) and t in rthr
    m = binary_metrics(y, p, threshold=.3)
    assert m['sensitivity'] == pytest.approx(np.mean(p[y] >= .3)) and m['specificity'] == pytest.approx(np.mean(p[~y] < .3))
    assert m['threshold_source'] == 'given' and binary_metrics(y, p)['threshold_source'] == 'youden_on_these_data'

def test_vectorised_bootstrap_statistics_match_sklearn():
    "The per-replicate statistics of the bootstrap (vectorised over replicates) equal scikit-learn row by row."
    s, m = np.round(np.random.default_rng(0).normal(size=(40, 50)), 1), 12               # many ties
    yy = np.r_[np.ones(m), np.zeros(50 - m)]
    np.testing.assert_allclose(auroc_rows(s[:, :m], s[:, m:]), [roc_auc_score(yy, r) for r in s], atol=1e-12)
    np.testing.assert_allclose(_ap_rows(s[:, :m], s[:, m:]), [average_precision_score(yy, r) for r in s], atol=1e-12)

def test_metrics_published_example_and_degenerate_inputs():
    # scikit-learn's documented example: roc_auc_score 0.75, average_precision_score 0.83
    assert auroc([0, 0, 1, 1], [.1, .4, .35, .8]) == .75
    assert average_precision([0, 0, 1, 1], [.1, .4, .35, .8]) == pytest.approx(0.8333333)
    assert np.isnan(auroc([1, 1], [.2, .3])) and np.isnan(average_precision([0, 0], [.2, .3]))
    with pytest.raises(ValueError, match='0/1'): auroc([0, 2], [.1, .2])
    with pytest.raises(ValueError): auroc([0, 1], [.1])

# ---------------------------------------------------------------- bootstrap
def test_bootstrap_deterministic_and_stratified():
    y, p, _ = tied_case(3, n=100)
    a, b = bootstrap_ci(y, p, 'auroc', n_boot=200, seed=1), bootstrap_ci(y, p, 'auroc', n_boot=200, seed=1)
    assert a == b and a['lo'] < a['estimate'] < a['hi'] and a['n_boot'] == 200
    assert bootstrap_ci(y, p, 'auroc', n_boot=200, seed=2) != a
    # the vectorised AUROC path equals the generic loop over the same resamples
    c = bootstrap_ci(y, p, lambda yy, pp: roc_auc_score(yy, pp), n_boot=200, seed=1)
    assert c['lo'] == pytest.approx(a['lo']) and c['hi'] == pytest.approx(a['hi'])
    # stratified: every replicate keeps the prevalence (a callable records it)
    seen = []
    bootstrap_ci(y, p, lambda yy, pp: seen.append(yy.mean()) or 0., n_boot=50, seed=0)
    assert set(np.round(seen, 12)) == {round(y.mean(), 12)}
    with pytest.raises(ValueError, match='threshold'): bootstrap_ci(y, p, 'sensitivity')
    one = bootstrap_ci(np.r_[1, np.zeros(20)], np.arange(21.), n_boot=50)                # one positive: no interval
    assert one['estimate'] == 0 and np.isnan(one['lo']) and one['n_boot'] == 0
    s = bootstrap_ci(y, p, 'specificity', threshold=.5, n_boot=100)
    assert 0 <= s['lo'] <= s['estimate'] <= s['hi'] <= 1

def test_bootstrap_agrees_with_a_hand_written_stratified_bootstrap():
    "scipy.stats.bootstrap (indices of positives and negatives resampled apart) against the loop it replaced."
    y, p, _ = tied_case(4, n=120)
    g, pos, neg = np.random.default_rng(11), np.flatnonzero(y), np.flatnonzero(~y)
    reps = [roc_auc_score(y[i], p[i]) for i in (np.r_[g.choice(pos, len(pos)), g.choice(neg, len(neg))] for _ in range(2000))]
    ci = bootstrap_ci(y, p, 'auroc', n_boot=2000, seed=0)
    assert ci['lo'] == pytest.approx(np.quantile(reps, .025), abs=.015) and ci['hi'] == pytest.approx(np.quantile(reps, .975), abs=.015)

def test_bootstrap_coverage_on_known_auroc():
    d = 1.0
    true = stats.norm.cdf(d / math.sqrt(2))
    y = np.r_[np.ones(40), np.zeros(160)].astype(bool)
    hits = 0
    for r in range(150):
        p = np.random.default_rng(r).normal(y * d, 1)
        ci = bootstrap_ci(y, p, n_boot=300, seed=r)
        hits += ci['lo'] <= true <= ci['hi']
    assert .87 <= hits / 150 <= .99

def test_hanley_mcneil_and_test_size():
    # the formula is derived for exponential-shaped scores: there it matches the simulated spread of the AUROC
    g = np.random.default_rng(0)
    sims = [auroc(np.r_[np.ones(50), np.zeros(50)], np.r_[g.exponential(4., 50), g.exponential(1., 50)]) for _ in range(600)]
    assert np.mean(sims) == pytest.approx(.8, abs=.01)                      # P(Exp(mean 4) > Exp(mean 1)) = 0.8
    assert hanley_mcneil_se(.8, 50, 50) == pytest.approx(np.std(sims, ddof=1), rel=.1)
    r = auroc_test_size(.8, .1, .05)
    assert 1.96 * hanley_mcneil_se(.8, r['n_pos'], r['n_images'] - r['n_pos']) <= .05
    assert auroc_test_size(.8, .1, .02)['n_images'] > r['n_images']

# ---------------------------------------------------------------- rarity
@pytest.fixture(scope='module')
def real(): return load_shared_subset(sample_data_root())

def test_simulate_rarity_caps_train_and_keeps_test(real):
    for k in (0, 3, 7):
        cap = simulate_rarity(real, 'nodule', k, seed=4)
        tr = cap.images[cap.images.split == 'train']
        assert int((tr['nodule'] == 1).sum()) == k
        pd.testing.assert_frame_equal(cap.images[cap.images.split == 'val'].reset_index(drop=True),
                                      real.images[real.images.split == 'val'].reset_index(drop=True))
        n_pos = int(((real.images.split == 'train') & (real.images['nodule'] == 1)).sum())
        assert len(cap.images) == len(real.images) - (n_pos - k) and len(cap.dropped) == n_pos - k
        assert not set(cap.annotations['image_id']) & set(cap.dropped)
        # only nodule positives were dropped; the negatives are all still there
        neg = real.images[(real.images.split == 'train') & (real.images['nodule'] != 1)]
        assert set(neg['image_id']) <= set(tr['image_id'])
    a, b = simulate_rarity(real, 'nodule', 3, seed=4), simulate_rarity(real, 'nodule', 3, seed=4)
    assert a.dropped == b.dropped and simulate_rarity(real, 'nodule', 3, seed=5).dropped != a.dropped
    with pytest.raises(DownstreamError, match="'k'"): simulate_rarity(real, 'nodule', 10_000)
    with pytest.raises(DownstreamError, match="'k'"): simulate_rarity(real, 'nodule', -1)
    with pytest.raises(DownstreamError, match="'hernia_x'"): simulate_rarity(real, 'hernia_x', 1)

# ---------------------------------------------------------------- refusals and one tiny end-to-end run
TINY = ClassifierConfig(epochs=1, width=4, image_size=32, batch_size=32)

@pytest.fixture(scope='module')
def small(real, tmp_path_factory):
    "A small real manifest (60 train, all 30 val images of the bundled sample) at 32 px."
    im = real.images
    keep = pd.concat([im[im.split == 'train'].groupby('patient_id', sort=True).head(1).head(60), im[im.split == 'val']])
    m = Manifest(keep.reset_index(drop=True), empty_annotations(), real.findings, real.root, 'small', real.origin)
    return resized_copy(m.subset(findings=list(FINDINGS)), 32, tmp_path_factory.mktemp('small'))

@pytest.fixture(scope='module')
def fake_cohort(small, tmp_path_factory):
    "A fake 'synthetic' cohort: copies of training images with synthetic=1, donors in the training split."
    tr = small.images[small.images.split == 'train'].head(12)
    im = tr.assign(image_id=[f'syn_{i:03d}' for i in range(len(tr))], patient_id=[f'syn_{i:03d}' for i in range(len(tr))],
                   synthetic=1, donor_image_id=tr['image_id'].values, source='synthetic')
    im.loc[im.index[:6], 'nodule'] = 1.
    return Manifest(im.reset_index(drop=True), empty_annotations(), list(FINDINGS), small.root, 'fake_cohort', 'fake_cohort.csv')

def test_refusals_before_training(small, fake_cohort, monkeypatch):
    import cxr_diffusion_nbs.downstream as ds
    monkeypatch.setattr(ds, 'train_classifier', lambda *a, **k: pytest.fail('trained before refusing'))
    leaky = dataclasses.replace(small, images=small.images.copy())
    val0 = leaky.images.index[leaky.images.split == 'val'][0]
    leaky.images.loc[val0, 'patient_id'] = leaky.images.loc[leaky.images.split == 'train', 'patient_id'].iloc[0]
    with pytest.raises(PatientLeakageError) as e: downstream_experiment(leaky, cfg=TINY)
    assert e.value.field == 'patient_id' and e.value.path == (small.origin or small.name)
    nolab = dataclasses.replace(small, images=small.images.drop(columns=['nodule']), findings=[f for f in FINDINGS if f != 'nodule'])
    with pytest.raises(DownstreamError) as e: downstream_experiment(nolab, cfg=TINY)
    assert e.value.field == 'nodule' and 'label' in str(e.value)
    with pytest.raises(DownstreamError, match="'split'"): downstream_experiment(small, cfg=TINY, test_split='test')
    empty = dataclasses.replace(fake_cohort, images=fake_cohort.images.iloc[:0])
    with pytest.raises(DownstreamError, match="'images'"): downstream_experiment(small, empty, counts=[2], cfg=TINY)
    with pytest.raises(DownstreamError, match="'images'"): downstream_experiment(small, None, counts=[2], cfg=TINY)
    with pytest.raises(DownstreamError, match="'counts'"): downstream_experiment(small, fake_cohort, counts=[13], cfg=TINY)
    with pytest.raises(ManifestError, match="'ratio'"): downstream_experiment(small, fake_cohort, ratios=[.5], cfg=TINY)
    to_test = fake_cohort.images.assign(donor_image_id=small.images.loc[val0, 'image_id'])
    with pytest.raises(PatientLeakageError, match="'donor_image_id'"):
        downstream_experiment(small, dataclasses.replace(fake_cohort, images=to_test), counts=[2], cfg=TINY)
    # an error in a later seed's mix also fails before the first training (all mixes are built first)
    with pytest.raises(ManifestError, match="'ratio'"): downstream_experiment(small, fake_cohort, ratios=[.1, .5], cfg=TINY, seeds=[0, 1])

def test_end_to_end_tiny_experiment(small, fake_cohort):
    preds = {}
    res = downstream_experiment(small, fake_cohort, ratios=[.1], counts=[4], cfg=TINY, seeds=[0], n_boot=50,
                                rarity=('nodule', 2), keep_predictions=preds)
    assert len(res) == 3 * len(FINDINGS)
    assert list(dict.fromkeys(res['condition'])) == ['real-only', 'ratio=0.1', 'n=4']
    assert set(res['rarity']) == {'nodule<=2'}
    assert (res.loc[res.finding == 'nodule', 'train_pos_real'] == 2).all()
    # the rarity mode draws synthetic images among the cohort's nodule positives
    assert res.loc[(res.finding == 'nodule') & (res.condition == 'n=4'), 'train_pos_synthetic'].item() == 4
    n_train = int(((small.images.split == 'train') & (small.images['nodule'] != 1)).sum()) + 2
    assert res.loc[res.condition == 'ratio=0.1', 'n_synthetic'].iloc[0] == round(.1 * n_train)
    n_val = int((small.images.split == 'val').sum())
    assert set(preds) == {('real-only', 0), ('ratio=0.1', 0), ('n=4', 0)} and preds[('n=4', 0)]['probs'].shape == (n_val, len(FINDINGS))
    assert res.loc[res.condition == 'real-only', 'delong_p'].isna().all()
    ok = res[(res.test_pos >= 2) & (res.test_neg >= 2) & (res.condition != 'real-only')]
    assert len(ok) and ok['delong_p'].between(0, 1).all()
    for m in ('auroc', 'auprc'):
        v = res[res.test_pos > 0]
        assert ((v[m + '_lo'] <= v[m] + 1e-12) & (v[m] <= v[m + '_hi'] + 1e-12)).all()
    s = summarise(res)
    assert len(s) == 3 * len(FINDINGS) and {'auroc', 'delong_p', 'auroc_sd'} <= set(s.columns)
    fig = utility_figure(res)
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt; plt.close(fig)
