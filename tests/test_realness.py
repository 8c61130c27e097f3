"""Realness measures against references and known cases: sharpness against SciPy's Laplacian, the radial spectrum of
white noise and of a single frequency, band ratios under blur, a detector that finds an easy difference and not a
non-existent one, the bootstrap interval, the refusals; and benchmarks/bench_realism.py end to end on the GAN."""
import importlib.util, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from cxr_diffusion_nbs.metrics import MetricsError
from cxr_diffusion_nbs.realness import (laplacian_variance, radial_power_spectrum, octave_bands, spectrum_ratios, contrast_ratios,
                                        detector_scores, auroc_interval, realness)

ROOT = Path(__file__).parents[1]

def smooth_films(n, size=64, seed=0, sigma=3.0):
    "Random smooth 'films' in [-1, 1] with texture added: blobs at several scales plus fine noise."
    g = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(g.standard_normal((n, 1, size, size)), (0, 0, sigma, sigma))
    x = x / np.abs(x).max() * .6 + .05 * g.standard_normal(x.shape)
    return torch.from_numpy(x.clip(-1, 1)).float()

def test_sharpness_matches_scipy_and_orders_blur():
    x = smooth_films(6)
    ref = np.array([ndimage.laplace(((im + 1) * 127.5).astype(np.float64))[1:-1, 1:-1].var() for im in x[:, 0].numpy()])
    np.testing.assert_allclose(laplacian_variance(x), ref, rtol=1e-6)
    blurred = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 0, 1, 1))).float()
    assert (laplacian_variance(blurred) < .5 * laplacian_variance(x)).all()
    assert laplacian_variance(torch.zeros(2, 1, 16, 16)).tolist() == [0, 0]

def test_radial_spectrum_of_a_single_frequency_and_of_noise():
    S, k = 64, 8
    yy, xx = np.meshgrid(np.arange(S), np.arange(S), indexing='ij')
    wave = torch.from_numpy(.5 * np.cos(2 * np.pi * k * xx / S))[None, None].float()
    p = radial_power_spectrum(wave)
    assert p.shape == (S // 2,) and int(np.argmax(p)) == k          # the energy sits at k cycles per image
    noise = torch.randn(128, 1, S, S, generator=torch.Generator().manual_seed(0)).clamp(-3, 3) / 3
    q = radial_power_spectrum(noise)[4:]
    assert q.max() / q.min() < 1.25                                   # white: flat

def test_octave_bands_and_ratios():
    assert octave_bands(64) == [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32)]
    assert octave_bands(256)[-1] == (64, 128) and octave_bands(256)[0] == (1, 8)
    x = smooth_films(16)
    same = spectrum_ratios(x, x)
    assert all(v == 1 for k, v in same.items() if k.startswith('band')) and same['spectrum_distance'] == 0
    r = spectrum_ratios(x, torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 0, 1.5, 1.5))).float())
    assert r['band_1_2'] > .9 and r['band_16_32'] < .05 and r['spectrum_distance'] > .3

def test_detector_tells_blur_and_not_two_samples_of_one_distribution():
    x = smooth_films(80, size=32, seed=1, sigma=1.5)                  # 32 px: the same question at a quarter of the cost
    blurred = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 0, 1, 1))).float()
    auc_blur = auroc_interval(*detector_scores(x[:40], blurred[40:], steps=80))
    auc_same = auroc_interval(*detector_scores(x[:40], x[40:], steps=80))
    assert auc_blur[0] > .9
    assert auc_same[1] < .5 < auc_same[2] and abs(auc_same[0] - .5) < .2

def test_out_of_fold_scores_cover_every_image_once_and_balance_classes():
    a, b = smooth_films(20, seed=2), smooth_films(30, seed=3)
    s, y = detector_scores(a, b, folds=2, steps=4)
    assert len(s) == len(y) == 40 and y.sum() == 20 and np.isfinite(s).all()

def test_auroc_interval_brackets_the_auroc():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(50), np.ones(50)]
    s = y + rng.standard_normal(100)
    auc, lo, hi = auroc_interval(s, y, n_boot=300)
    assert auc == pytest.approx(roc_auc_score(y, s)) and lo < auc < hi and hi - lo < .3

def test_realness_report_keys_and_control():
    x = smooth_films(48, size=32, seed=4, sigma=1.5)
    r = realness(x[:24], torch.from_numpy(ndimage.gaussian_filter(x[24:].numpy(), (0, 0, 1, 1))).float(), control=x[24:], size=None, steps=60)
    for k in ('detector_auroc', 'detector_auroc_low', 'detector_auroc_high', 'control_auroc', 'sharpness_ratio',
              'sharpness_auroc', 'band_8_16', 'spectrum_distance'):
        assert k in r and np.isfinite(r[k])
    assert r['sharpness_ratio'] < .5 and r['sharpness_auroc'] > .9 and r['detector_auroc'] > r['control_auroc']

def test_contrast_and_the_coarse_detector_see_greyer_films_that_are_as_sharp():
    "Films pulled towards one grey lose contrast and brightness spread; the coarse detector sees it, the edges stay as sharp as they were."
    x = smooth_films(64, size=32, seed=5, sigma=1.5)
    grey = x[32:] * .6 + .3 * torch.sign(x[32:]) * (x[32:].abs() > .9)   # greyer films with hard-edged bright spots
    r = realness(x[:32], grey.clamp(-1, 1), size=None, steps=60, coarse=2)
    assert r['contrast_ratio'] < .8 and r['brightness_spread_ratio'] < .8 and r['coarse_detector_auroc'] > .8
    same = contrast_ratios(x[:32], x[32:])
    assert abs(same['contrast_ratio'] - 1) < .2 and abs(same['brightness_spread_ratio'] - 1) < .4

def test_a_bad_coarse_is_refused_before_any_detector_is_trained(monkeypatch):
    import cxr_diffusion_nbs.realness as rn
    monkeypatch.setattr(rn, 'detector_scores', lambda *a, **k: pytest.fail('a detector was trained before the refusal'))
    x = smooth_films(16, size=32)
    with pytest.raises(MetricsError, match='coarse'): realness(x[:8], x[8:], size=None, coarse=8)   # 32 px / 8 < 8 px
    with pytest.raises(MetricsError, match='coarse'): realness(x[:8], x[8:], size=None, coarse=True)

def test_auroc_interval_replicates_are_sklearns_aurocs_of_the_same_draws():
    "The vectorised bootstrap gives each replicate exactly sklearn's AUROC (ties counted half) of the same resampled films."
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(30), np.ones(20)]; s = np.round(rng.standard_normal(50) + y, 1)   # rounded: many ties
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draw = np.random.default_rng(7)
    boots = [roc_auc_score(np.r_[np.ones(20), np.zeros(30)], np.r_[s[draw.choice(pos, 20)], s[draw.choice(neg, 30)]]) for _ in range(200)]
    auc, lo, hi = auroc_interval(s, y, n_boot=200, seed=7)
    assert auc == pytest.approx(roc_auc_score(y, s))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(boots, [.025, .975])), rel=1e-12)

def test_refusals():
    x = smooth_films(8)
    with pytest.raises(MetricsError, match='size'): realness(x, smooth_films(8, size=32), size=None)
    with pytest.raises(MetricsError, match='at least 8 needed'): detector_scores(x[:5], x[:5], folds=2)
    with pytest.raises(MetricsError, match=r'\[-1, 1\]'): laplacian_variance(x * 3)
    with pytest.raises(MetricsError, match='shape'): radial_power_spectrum(torch.zeros(2, 3, 8, 8))

def test_bench_realism_prints_the_table_and_the_targets():
    out = subprocess.run([sys.executable, 'benchmarks/bench_realism.py', '--generators', 'data/models/gan64', '--n', '24',
                          '--detector-steps', '20', '--threads', '1', '--data-root', 'data/cxr14_sample'],   # the bundled sample: seconds
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'real validation films (control)' in out.stdout and 'gan64' in out.stdout
    assert 'targets (issue 23)' in out.stdout and 'summary: no diffusion generator' in out.stdout
    spec = importlib.util.spec_from_file_location('bench_realism', ROOT/'benchmarks'/'bench_realism.py')   # the refusal in this
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)                         # process: no second start-up
    with pytest.raises(SystemExit, match='nope'):
        bench.main(['--generators', 'data/models/gan64', '--set', 'nope:steps=3', '--threads', str(torch.get_num_threads())])
