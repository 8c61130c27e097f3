"""Fidelity metrics against references: FID vs scipy, KID vs a hand-written unbiased MMD, PRDC on hand-counted cases,
MS-SSIM vs torchmetrics, SSIM / PSNR (scikit-image) vs the package's own SSIM and the formula, lesion SSIM vs
scikit-image on the box, the torchmetrics feature wrapper, user TorchScript
extractors, and the refusals (empty folders, wrong sizes, missing labels, too few images)."""
import json
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from torch import nn
from PIL import Image
from scipy import linalg
from skimage.metrics import structural_similarity
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from cxr_diffusion_nbs.core import CXRDataError, sample_data_root
from cxr_diffusion_nbs.losses import ssim as loss_ssim
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.classifier import CXRClassifier, ClassifierConfig, save_classifier
from cxr_diffusion_nbs.metrics import (MetricsError, FeatureExtractor, feature_extractor, extract_features, fid_from_features,
                                       kid_from_features, prdc, ms_ssim, pairwise_ms_ssim, diversity_by_finding, paired_ssim,
                                       psnr, lesion_ssim, embed_2d, embedding_figure, compare_sets, fidelity_report,
                                       load_image_set, check_images, MS_SSIM_BETAS)


def fid_scipy(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))

def mmd2_unbiased(x, y, degree=3):
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** degree
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m = len(x)
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()

@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return CXRClassifier(5, width=4).eval()

def imgs(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1

# ---- FID / KID
@pytest.mark.parametrize('n,d', [(50, 8), (300, 16), (20, 32)])
def test_fid_matches_scipy(n, d):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((n, d)), rng.standard_normal((n + 7, d)) * 1.3 + .2
    assert fid_from_features(a, b) == pytest.approx(fid_scipy(a, b), rel=1e-5, abs=1e-6)

def test_fid_zero_for_identical_and_translation():
    a = np.random.default_rng(0).standard_normal((100, 6))
    assert fid_from_features(a, a) == pytest.approx(0, abs=1e-6)
    assert fid_from_features(a, a + 2) == pytest.approx(6 * 4, rel=1e-6)     # only the means differ: |mu1-mu2|^2

def test_kid_matches_hand_mmd():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((40, 10)), rng.standard_normal((40, 10)) + .4
    m, s = kid_from_features(a, b, subsets=2, subset_size=40)
    assert m == pytest.approx(mmd2_unbiased(a, b), rel=1e-9) and s == pytest.approx(0, abs=1e-12)
    m1, s1 = kid_from_features(a, b, subsets=20, seed=1)
    assert (m1, s1) == kid_from_features(a, b, subsets=20, seed=1)          # seeded
    assert s1 > 0 and m1 == pytest.approx(mmd2_unbiased(a, b), abs=4 * s1)

def test_kid_unbiased_near_zero_for_same_distribution():
    rng = np.random.default_rng(5)
    vals = [kid_from_features(rng.standard_normal((30, 8)), rng.standard_normal((30, 8)), subsets=10, seed=i)[0] for i in range(20)]
    assert abs(np.mean(vals)) < 3 * np.std(vals) / np.sqrt(20) + 1e-3

def test_fid_kid_refusals():
    a = np.zeros((5, 4))
    with pytest.raises(MetricsError, match="at least 2 needed"): fid_from_features(a, a[:1])
    with pytest.raises(MetricsError, match="4 dimensions vs 3"): fid_from_features(np.ones((5, 3)), a)
    with pytest.raises(MetricsError, match="NaN"): fid_from_features(np.full((5, 4), np.nan), a)
    with pytest.raises(MetricsError, match="subset_size"): kid_from_features(a, a, subset_size=9)

# ---- the torchmetrics wrapper and user extractors
def test_wrapper_in_torchmetrics_fid_and_kid(model):
    ext = FeatureExtractor(model, 64)
    assert ext.num_features == model.num_features == 32
    x = imgs(12)
    fr, ff = extract_features(ext, x[:6]), extract_features(ext, x[6:])
    np.testing.assert_allclose(fr, model.features(x[:6]).detach().numpy(), rtol=1e-5, atol=1e-6)
    m = FrechetInceptionDistance(feature=ext)
    m.update(x[:6], real=True); m.update(x[6:], real=False)
    assert float(m.compute()) == pytest.approx(fid_scipy(fr, ff), rel=1e-3, abs=1e-5)
    k = KernelInceptionDistance(feature=ext, subsets=1, subset_size=6)
    k.update(x[:6], real=True); k.update(x[6:], real=False)
    assert float(k.compute()[0]) == pytest.approx(mmd2_unbiased(fr, ff), rel=1e-4, abs=1e-8)
    ext.train()                                                             # metrics may call .train(): stays eval
    assert not ext.training and not model.training
    u8 = ((x[:2] + 1) * 127.5).round().byte()
    np.testing.assert_allclose(ext(u8), ext(u8.float() / 127.5 - 1))
    with pytest.raises(MetricsError, match=r"expected \(B, 1, 64, 64\)"): ext(imgs(2, 32))
    with pytest.raises(MetricsError, match="field 'size'"): extract_features(ext, imgs(2, 32))

def test_user_torchscript_and_module_extractors(tmp_path, model):
    net = torch.jit.script(nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    torch.jit.save(net, str(tmp_path/'ext.pt'))
    e = feature_extractor(tmp_path/'ext.pt')
    x = imgs(5)
    np.testing.assert_allclose(extract_features(e, x), net(x).detach().double().numpy(), rtol=1e-5)
    assert e.num_features == 3 and feature_extractor(net).num_features == 3
    save_classifier(model, ClassifierConfig(width=4), tmp_path/'clf')
    assert feature_extractor(tmp_path/'clf').num_features == 32
    (tmp_path/'junk.pt').write_bytes(b'not torchscript')
    with pytest.raises(MetricsError, match="junk.pt: field 'feature_extractor': not a TorchScript"): feature_extractor(tmp_path/'junk.pt')
    with pytest.raises(MetricsError, match="no such file"): feature_extractor(tmp_path/'missing.pt')
    with pytest.raises(MetricsError, match=r"must map \(B, 1, S, S\) to \(B, D\)"): feature_extractor(nn.Conv2d(1, 2, 3))

def test_user_torch_export_extractor(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    ep = torch.export.export(net, (imgs(2),), dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    torch.export.save(ep, str(tmp_path/'ext.pt2'))
    e = feature_extractor(tmp_path/'ext.pt2')
    x = imgs(5)
    np.testing.assert_allclose(extract_features(e, x), net(x).detach().double().numpy(), rtol=1e-5, atol=1e-7)
    e.train()
    assert not e.training

# ---- PRDC
def test_prdc_hand_counted():
    r = np.array([[0.], [1.], [2.], [3.]])
    assert prdc(r, np.array([[.5], [10.]]), k=1) == dict(precision=.5, recall=1., density=1., coverage=.5)
    # k = 2: real radii (2nd neighbour) 2, 1, 1, 2; synthetic 0.5, 1.5, 9 -> radii 1, 1, 7.5
    s = np.array([[.5], [1.5], [9.]])
    out = prdc(r, s, k=2)
    # precision: .5 in balls of 0,1,2 (d .5<2, .5<1, 1.5<1? no) -> yes; 1.5 yes; 9 no -> 2/3
    # density: .5 in {0 (.5<2), 1 (.5<1)} = 2; 1.5 in {0 (1.5<2), 1 (.5<1), 2 (.5<1), 3 (1.5<2)} = 4; 9: 0 -> (6/3)/2 = 1
    # recall: real in some synthetic ball: 0 (|0-.5|<1), 1 (yes), 2 (|2-1.5|<1), 3 (|3-9|=6<7.5) -> 1
    # coverage: nearest synthetic within own radius: 0 (.5<2), 1 (.5<1), 2 (.5<1), 3 (1.5<2) -> 1
    assert out == pytest.approx(dict(precision=2 / 3, recall=1., density=1., coverage=1.))

def test_prdc_identical_and_disjoint():
    g = np.random.default_rng(0).standard_normal((40, 5))
    assert prdc(g, g) == dict(precision=1., recall=1., density=1., coverage=1.)
    assert prdc(g, g + 50) == dict(precision=0., recall=0., density=0., coverage=0.)
    with pytest.raises(MetricsError, match='at least 6 needed'): prdc(g[:5], g)

def test_prdc_matches_brute_force():
    rng = np.random.default_rng(7)
    r, s, k = rng.standard_normal((30, 3)), rng.standard_normal((25, 3)) * 1.5, 3
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    rr = np.sort(d(r, r), 1)[:, k]; ss = np.sort(d(s, s), 1)[:, k]; rs = d(r, s)
    ref = dict(precision=np.mean([any(rs[i, j] < rr[i] for i in range(30)) for j in range(25)]),
               recall=np.mean([any(rs[i, j] < ss[j] for j in range(25)) for i in range(30)]),
               density=np.mean([sum(rs[i, j] < rr[i] for i in range(30)) for j in range(25)]) / k,
               coverage=np.mean([rs[i].min() < rr[i] for i in range(30)]))
    assert prdc(r, s, k) == pytest.approx(ref)

# ---- MS-SSIM, SSIM, PSNR, lesion SSIM
def test_ms_ssim_against_torchmetrics_and_pairs():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ref
    x = imgs(6); y = (x + .2 * torch.randn_like(x)).clamp(-1, 1)
    np.testing.assert_allclose(ms_ssim(x, y), ref(x, y, kernel_size=7, betas=MS_SSIM_BETAS, data_range=2., reduction='none'), rtol=1e-6)
    assert sum(MS_SSIM_BETAS) == pytest.approx(1) and len(MS_SSIM_BETAS) == 3
    p = pairwise_ms_ssim(x)
    assert len(p) == 15 and p[0] == pytest.approx(float(ms_ssim(x[:1], x[1:2])[0]), rel=1e-6)
    assert len(pairwise_ms_ssim(x, max_pairs=4)) == 4
    same = torch.cat([x[:1]] * 4)
    np.testing.assert_allclose(pairwise_ms_ssim(same), 1, atol=1e-5)
    with pytest.raises(MetricsError, match='too small'): ms_ssim(x, y, kernel_size=11, betas=(.2,) * 5)
    with pytest.raises(MetricsError, match='at least 2 needed'): pairwise_ms_ssim(x[:1])

def test_diversity_by_finding_detects_collapse():
    rng = torch.Generator().manual_seed(0)
    real = dict(images=torch.rand(10, 1, 64, 64, generator=rng) * 2 - 1, labels=np.eye(2)[[0, 1] * 5], findings=('a', 'b'))
    proto = torch.rand(1, 1, 64, 64, generator=rng) * 2 - 1
    syn = dict(images=(proto + .05 * torch.randn(6, 1, 64, 64, generator=rng)).clamp(-1, 1), labels=np.eye(2)[[0, 1] * 3], findings=('a', 'b'))
    t = diversity_by_finding(real, syn)
    assert list(t.finding) == ['a', 'b'] and list(t.n_real) == [5, 5] and list(t.n_synthetic) == [3, 3]
    assert (t.ms_ssim_synthetic > t.ms_ssim_real + .3).all()
    with pytest.raises(MetricsError, match="field 'labels'"): diversity_by_finding(real, dict(syn, labels=None))
    with pytest.raises(MetricsError, match="field 'size'"):
        diversity_by_finding(real, dict(syn, images=torch.zeros(6, 1, 32, 32)))

@pytest.mark.parametrize('seed', [0, 1])
def test_ssim_psnr_match_independent_implementations(seed):
    "paired_ssim / psnr call scikit-image; the package's own SSIM (the loss's, from the paper) and the PSNR formula agree."
    a = imgs(3, seed=seed); b = (a + .15 * torch.randn(a.shape, generator=torch.Generator().manual_seed(9))).clamp(-1, 1)
    np.testing.assert_allclose(paired_ssim(a, b), loss_ssim(a.double(), b.double(), data_range=2., window=11, sigma=1.5).numpy(), atol=1e-6)
    mse = ((a.double() - b.double()) ** 2).mean((1, 2, 3)).numpy()
    np.testing.assert_allclose(psnr(a, b), 10 * np.log10(4 / mse), atol=1e-9)
    assert np.isinf(psnr(a, a)).all() and paired_ssim(a, a) == pytest.approx(1)

def test_lesion_ssim_is_ssim_of_the_box():
    a = imgs(2); b = (a + .3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    b[1, :, :, :32] = a[1, :, :, :32]                        # the left half kept, the right half noisy
    m = torch.zeros(2, 2, 64, 64); m[0, 1, 10:20, 40:50] = 1; m[1, 0, 30:40, 8:20] = 1
    ls = lesion_ssim(a, b, m, margin=2)
    an, bn = a.double().numpy()[:, 0], b.double().numpy()[:, 0]
    kw = dict(data_range=2, gaussian_weights=True, sigma=.9, use_sample_covariance=False, win_size=7)
    assert ls[0] == pytest.approx(structural_similarity(an[0, 8:22, 38:52], bn[0, 8:22, 38:52], **kw), abs=1e-6)
    assert ls[1] == pytest.approx(1) and paired_ssim(a[1:], b[1:])[0] < .8   # lesion kept, the image not
    assert np.isnan(lesion_ssim(a, b, torch.zeros(2, 1, 64, 64))).all()
    with pytest.raises(MetricsError, match="field 'mask'"): lesion_ssim(a, b, torch.zeros(1, 1, 64, 64))

# ---- embedding, compare_sets
def test_embed_and_figure():
    rng = np.random.default_rng(0)
    r, s = rng.standard_normal((40, 6)), rng.standard_normal((10, 6)) + 3
    rxy, sxy, method = embed_2d(r, s, 'pca')
    assert rxy.shape == (40, 2) and sxy.shape == (10, 2) and method == 'pca'
    assert abs(rxy[:, 0].mean() - sxy[:, 0].mean()) > 2                # the shift lands on the first component
    fig = embedding_figure(r, s, np.eye(2)[rng.integers(0, 2, 40)], np.eye(2)[[0, 1] * 5], ('a', 'b'), method='pca')
    assert len(fig.axes) == 2 and fig.get_size_inches()[0] <= 10
    with pytest.raises(MetricsError, match="field 'labels'"): embedding_figure(r, s, np.zeros((40, 3)), np.zeros((10, 2)), ('a', 'b'))
    with pytest.raises(MetricsError, match="field 'method'"): embed_2d(r, s, 'tsne')

def test_embedding_uses_umap_by_default():
    "umap-learn is a dependency: 'auto' is UMAP (reproducible with its seed); PCA only for sets too small for 15 neighbours."
    rng = np.random.default_rng(0)
    r, s = rng.standard_normal((60, 6)), rng.standard_normal((20, 6)) + 4
    rxy, sxy, method = embed_2d(r, s)
    assert method == 'umap' and rxy.shape == (60, 2) and sxy.shape == (20, 2)
    np.testing.assert_allclose(embed_2d(r, s)[1], sxy, atol=1e-4)            # same seed, same map
    assert np.linalg.norm(rxy.mean(0) - sxy.mean(0)) > 2 * rxy.std(0).mean()   # the shifted set forms its own cluster
    assert embed_2d(r[:8], s[:4])[2] == 'pca'

def test_compare_sets_from_images_and_features(model):
    ext = FeatureExtractor(model)
    a, b = imgs(12, seed=1), imgs(10, seed=2)
    out = compare_sets(a, b, ext, kid_subsets=5)
    fa, fb = extract_features(ext, a), extract_features(ext, b)
    assert out['fid'] == pytest.approx(fid_scipy(fa, fb), rel=1e-5) and out['n_real'] == 12 and out['n_synthetic'] == 10
    assert out == pytest.approx(compare_sets(fa, fb, kid_subsets=5))
    t = fidelity_report({'x': (fa, fb), 'y': (fa, fa)}, kid_subsets=5)
    assert list(t.index) == ['x', 'y'] and t.loc['y', 'fid'] == pytest.approx(0, abs=1e-6) and t.loc['y', 'precision'] == 1
    with pytest.raises(MetricsError, match="field 'size'"): compare_sets(a, imgs(10, 32), ext)
    with pytest.raises(MetricsError, match="no extractor"): compare_sets(a, b)
    with pytest.raises(MetricsError, match="FID needs 2 and PRDC"): compare_sets(fa, fb[:3])

# ---- loading image sets
def test_load_image_set_refusals(tmp_path):
    (tmp_path/'empty').mkdir()
    with pytest.raises(MetricsError, match=r"empty: field 'images': no image files"): load_image_set(tmp_path/'empty')
    with pytest.raises(MetricsError, match="does not exist"): load_image_set(tmp_path/'nope')
    d = tmp_path/'pngs'; d.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d/'a.png'); Image.fromarray(np.full((32, 32), 255, np.uint8)).save(d/'b.png')
    s = load_image_set(d)
    assert s['images'].shape == (2, 1, 32, 32) and s['labels'] is None and s['image_ids'] == ['a', 'b']
    assert float(s['images'][0].max()) == -1 and float(s['images'][1].min()) == 1
    with pytest.raises(MetricsError, match="field 'size': images are 32 px, expected 64"): load_image_set(d, size=64)
    with pytest.raises(MetricsError, match="field 'labels'"): load_image_set(d, findings=('nodule',))
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(d/'c.png')
    with pytest.raises(MetricsError, match=r"c.png: field 'size'"): load_image_set(d)
    with pytest.raises(MetricsError, match="field 'images'"): check_images(torch.zeros(2, 3, 8, 8))
    with pytest.raises(MetricsError, match=r"values must lie in \[-1, 1\]"): check_images(torch.full((2, 1, 8, 8), 3.))

def test_load_image_set_from_manifest():
    m = load_shared_subset(sample_data_root())
    s = load_image_set(m, size=64, findings=('nodule', 'mass'), split='val')
    assert s['images'].shape[1:] == (1, 64, 64) and s['labels'].shape == (len(s['images']), 2)
    with pytest.raises(MetricsError, match="field 'not_a_finding': the manifest has no label column"):
        load_image_set(m, size=64, findings=('nodule', 'not_a_finding'))
    with pytest.raises(MetricsError, match="field 'split'"): load_image_set(m, size=64, split='test_xyz')
    assert issubclass(MetricsError, CXRDataError)
