"""Memorisation check: nearest neighbours against brute force, exact copies (distance 0, SSIM 1), calibrated thresholds
flag planted copies and few held-out images, the donor analysis, the figure, and refusals."""
import numpy as np, pandas as pd, pytest, torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from cxr_diffusion_nbs.core import CXRDataError
from cxr_diffusion_nbs.metrics import MetricsError
from cxr_diffusion_nbs.memorisation import (MemorisationError, feature_distances, nearest_real, calibrate_thresholds,
                                            flag_copies, donor_analysis, closest_pairs_figure)


def smooth_images(n, size=32, seed=0):
    "Random smooth images in [-1, 1]: blurred noise, so SSIM behaves as on natural images."
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 1, size + 6, size + 6, generator=g), 7, 1)
    return (x / x.abs().amax((1, 2, 3), keepdim=True)).clamp(-1, 1)

def test_feature_distances_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 4)), rng.standard_normal((9, 4))
    cos = np.array([[1 - x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])
    euc = np.array([[np.linalg.norm(x - y) for y in b] for x in a])
    np.testing.assert_allclose(feature_distances(a, b), cos, atol=1e-12)
    np.testing.assert_allclose(feature_distances(a, b, 'euclidean'), euc, atol=1e-9)
    with pytest.raises(MemorisationError, match="field 'metric'"): feature_distances(a, b, 'manhattan')
    with pytest.raises(MemorisationError, match="field 'features': 3 dimensions vs 4"): feature_distances(a, b[:, :3])

@pytest.mark.parametrize('metric', ['cosine', 'euclidean'])
def test_nearest_index_matches_brute_force(metric):
    rng = np.random.default_rng(1)
    s, r = rng.standard_normal((12, 6)), rng.standard_normal((40, 6))
    t = nearest_real(s, r, metric=metric, real_ids=[f'r{j}' for j in range(40)])
    d = feature_distances(s, r, metric)
    ref = [min(range(40), key=lambda j: d[i, j]) for i in range(12)]
    assert list(t.nn_index) == ref and list(t.nn_id) == [f'r{j}' for j in ref]
    np.testing.assert_allclose(t.nn_distance, d.min(1))

def test_exact_copy_distance_zero_ssim_one_and_ssim_search():
    r = smooth_images(30); fr = np.random.default_rng(2).standard_normal((30, 8))
    s = r[[4, 17]]; fs = fr[[4, 17]]
    t = nearest_real(fs, fr, s, r, k_ssim=3)
    assert list(t.nn_index) == [4, 17] and list(t.ssim_index) == [4, 17]
    np.testing.assert_allclose(t.nn_distance, 0, atol=1e-12); np.testing.assert_allclose(t.ssim, 1, atol=1e-5)
    # a copy the features miss (random features) is still found by SSIM through the pixel candidates
    t2 = nearest_real(np.random.default_rng(3).standard_normal((1, 8)), fr, r[[9]], r, k_ssim=3)
    assert t2.ssim_index[0] == 9 and t2.ssim[0] == pytest.approx(1)
    # best SSIM over all real images equals a brute-force skimage search
    q = (r[[5]] + .2 * smooth_images(1, seed=7)).clamp(-1, 1)
    t3 = nearest_real(fr[[0]], fr, q, r, k_ssim=None)
    ref = [structural_similarity(q[0, 0].double().numpy(), r[j, 0].double().numpy(), data_range=2, gaussian_weights=True,
                                 sigma=.9, use_sample_covariance=False, win_size=7) for j in range(30)]
    assert t3.ssim_index[0] == int(np.argmax(ref)) == 5 and t3.ssim[0] == pytest.approx(max(ref), abs=1e-5)

def test_planted_copies_are_flagged_and_held_out_mostly_not():
    train = smooth_images(200, seed=10)
    val = smooth_images(100, seed=11)
    feat = lambda x: F.avg_pool2d(x, 4).flatten(1).double().numpy()        # a stand-in extractor: 8x8 thumbnails
    th = calibrate_thresholds(feat(val[:50]), feat(train), val[:50], train, q=.02)
    assert th['q'] == .02 and th['n_reference'] == 50 and 0 < th['ssim'] < 1
    g = torch.Generator().manual_seed(0)
    planted = torch.cat([train[:5], (train[5:10] + .03 * torch.randn(5, 1, 32, 32, generator=g)).clamp(-1, 1)])
    tp = nearest_real(feat(planted), feat(train), planted, train)
    assert flag_copies(tp, th).all()
    assert list(tp.nn_index[:5]) == [0, 1, 2, 3, 4]
    tv = nearest_real(feat(val[50:]), feat(train), val[50:], train)
    assert flag_copies(tv, th).mean() <= .1
    assert flag_copies(tv, th, 'both').sum() <= flag_copies(tv, th, 'distance').sum() <= flag_copies(tv, th, 'either').sum()
    with pytest.raises(MemorisationError, match="field 'rule'"): flag_copies(tv, th, 'any')
    with pytest.raises(MemorisationError, match="field 'q'"): calibrate_thresholds(feat(val), feat(train), q=.7)
    nosim = calibrate_thresholds(feat(val), feat(train))
    assert nosim['ssim'] is None and flag_copies(tv[['nn_index', 'nn_distance']], nosim).dtype == bool
    with pytest.raises(MemorisationError, match="field 'ssim'"): flag_copies(tv[['nn_index', 'nn_distance']], nosim, 'ssim')

def test_donor_analysis():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((60, 8)); donors = rng.integers(0, 60, 40); groups = np.array(list('ab') * 20)
    copy = donor_analysis(real[donors] + .01 * rng.standard_normal((40, 8)), real, donors, groups, n_perm=300)
    assert copy['donor_is_nearest'] == 1 and copy['median_donor_rank'] == 0 and copy['p_value'] < .01 and copy['chance'] < .2
    fresh = donor_analysis(rng.standard_normal((40, 8)), real, donors, groups, n_perm=300)
    assert fresh['donor_is_nearest'] <= .15 and fresh['p_value'] > .01 and fresh['median_donor_percentile'] > 10
    part = donor_analysis(real[donors], real, np.where(np.arange(40) < 10, -1, donors), n_perm=50)
    assert part['n'] == 30
    with pytest.raises(MemorisationError, match="field 'donor_image_id': no donor"): donor_analysis(real[:3], real, [-1, -1, -1])
    with pytest.raises(MemorisationError, match="field 'donor_image_id': 2 donors for 3"): donor_analysis(real[:3], real, [0, 1])

def test_refusals():
    r = smooth_images(10); f = np.random.default_rng(0).standard_normal((10, 4))
    with pytest.raises(MetricsError, match="at least 1 needed"): nearest_real(np.zeros((0, 4)), f)
    with pytest.raises(MetricsError, match="field 'size'"): nearest_real(f[:2], f, smooth_images(2, 16), r)
    with pytest.raises(MemorisationError, match="3 synthetic / 10 real images for 2 / 10"): nearest_real(f[:2], f, r[:3], r)
    with pytest.raises(MemorisationError, match="field 'real_ids'"): nearest_real(f[:2], f, real_ids=['a'])
    with pytest.raises(MetricsError, match="field 'images'"): nearest_real(f[:2], f, r[:2], None)
    assert issubclass(MemorisationError, CXRDataError)

def test_closest_pairs_figure():
    r = smooth_images(10); f = np.random.default_rng(0).standard_normal((10, 4))
    t = nearest_real(f[:4], f, r[:4], r)
    fig = closest_pairs_figure(r[:4], r, t, n=3, flags=[True, False, False, False])
    assert len(fig.axes) == 6 and fig.get_size_inches()[0] <= 10
    assert fig.axes[0].get_title().startswith('FLAGGED') or any(a.get_title().startswith('FLAGGED') for a in fig.axes[:3])
    assert len(closest_pairs_figure(r[:4], r, t, n=2, by='distance').axes) == 4
    with pytest.raises(MemorisationError, match="field 'by'"): closest_pairs_figure(r[:4], r, t, by='psnr')
