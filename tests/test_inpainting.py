"""Lesion insertion (RePaint): the outside stays exact, seeds reproduce, metrics match scikit-image, bad requests fail
before any compute. Fast cases use an untrained `tiny` model; one case uses the shipped CPU demo model."""
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio
from cxr_diffusion_nbs.core import CXRDataError, project_root
from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, ConditioningConfig
from cxr_diffusion_nbs.unet import unet_preset, make_noise_scheduler
from cxr_diffusion_nbs.sampling import sample
from cxr_diffusion_nbs.inpainting import (InpaintingError, insert_lesion, make_repaint_scheduler, model_calls,
                                          lesion_region, finding_labels, psnr_outside, change_inside, seam_gradient,
                                          inpainting_metrics, before_after_figure, blend_alpha, blend_into)

QUICK = dict(steps=8, jump_length=2, jump_n_sample=2)

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    ucfg = unet_preset('tiny')
    return ConditionalDenoiser(ucfg, ConditioningConfig()).eval(), make_noise_scheduler(ucfg)

@pytest.fixture(scope='module')
def data():
    g = torch.Generator().manual_seed(1)
    # a smooth "radiograph": a vertical gradient with a bright blob, in [-1, 1]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing='ij')
    base = (0.6 * yy + 0.5 * torch.exp(-((xx - .3)**2 + yy**2) / .1) - .2).clamp(-1, 1)
    img = (base + .05 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1)
    mask = torch.zeros(1, 32, 32); mask[0, 10:17, 12:20] = 1
    return img, mask

def test_scheduler_matches_training_noise(tiny):
    _, ns = tiny
    rs = make_repaint_scheduler(ns, steps=50, jump_length=10, jump_n_sample=3)
    assert torch.allclose(rs.alphas_cumprod, ns.alphas_cumprod, atol=1e-6)
    assert model_calls(rs) == 50 + 4 * 2 * 10
    assert rs.timesteps[-1] == 0 and (np.diff(rs.timesteps.numpy()) > 0).any()   # it goes back up
    assert model_calls(make_repaint_scheduler(ns, steps=20, jump_length=5, jump_n_sample=1)) == 20

def test_outside_is_faithful_and_inside_changes(tiny, data):
    model, ns = tiny
    img, mask = data
    res = insert_lesion(model, ns, img, mask, 'nodule', seed=0, dilate=1, **QUICK)
    assert res.images.shape == img.shape and res.model_calls == model_calls(make_repaint_scheduler(ns, **QUICK))
    out = res.region < .5
    assert torch.equal(res.images[out], img[out])                        # bit-exact outside the regenerated region
    assert np.isinf(psnr_outside(img, res.images, res.region)).all()
    p_mask = psnr_outside(img, res.images, mask)                       # only the 1-px ring differs
    # an untouched run (plain conditional sampling, no RePaint) is nowhere near as faithful
    free = sample(model, ns, dict(labels=res.labels, mask=res.mask), n=len(img), sampler='ddim', steps=8, seed=0).images
    p_free = psnr_outside(img, free, mask)
    assert (p_mask > 20).all() and (p_free < 12).all() and (p_mask > p_free + 10).all(), (p_mask, p_free)
    assert (change_inside(img, res.images, mask) > .05).all()
    assert res.region.sum() > res.mask.sum() and torch.equal(res.region * res.mask, res.mask)

def test_dilate_zero_keeps_everything_outside_the_mask(tiny, data):
    model, ns = tiny
    img, mask = data
    res = insert_lesion(model, ns, img[:1], mask, 'mass', seed=3, dilate=0, **QUICK)
    assert torch.equal(res.region, res.mask)
    assert np.isinf(psnr_outside(img[:1], res.images, mask))

def test_seeds(tiny, data):
    model, ns = tiny
    img, mask = data
    a = insert_lesion(model, ns, img[:2], mask, 'nodule', seed=[5, 6], **QUICK)
    b = insert_lesion(model, ns, img[:2], mask, 'nodule', seed=[5, 6], **QUICK)
    c = insert_lesion(model, ns, img[:2], mask, 'nodule', seed=[7, 8], **QUICK)
    assert torch.equal(a.images, b.images)
    inside = a.region > .5
    assert (a.images - c.images).abs()[inside].mean() > 1e-2
    assert torch.equal(a.images[~inside], c.images[~inside])
    alone = insert_lesion(model, ns, img[1], mask, 'nodule', seed=6, **QUICK)   # an image depends on its seed, not its batch
    assert torch.allclose(alone.images[0], a.images[1], atol=1e-4)

def test_conditions_and_guidance(tiny, data):
    model, ns = tiny
    img, mask = data
    res = insert_lesion(model, ns, img[:2], mask, ['nodule', ['mass', 'effusion']], seed=0,
                        guidance={'labels': 2.0, 'mask': 1.0}, **QUICK)
    f = model.cond_cfg.findings
    assert res.labels[0, f.index('nodule')] == 1 and res.labels[0].sum() == 1
    assert res.labels[1, f.index('mass')] == 1 and res.labels[1, f.index('effusion')] == 1 and res.labels[1].sum() == 2
    plain = insert_lesion(model, ns, img[:2], mask, ['nodule', ['mass', 'effusion']], seed=0, **QUICK)
    assert not torch.equal(res.images, plain.images)                   # guidance changes the prediction
    assert torch.equal(res.images[res.region < .5], plain.images[plain.region < .5])
    assert finding_labels('', f, 2).sum() == 0                          # no finding: a healthy fill

@pytest.mark.parametrize('kw,field', [
    (dict(findings='atelectasis'), 'findings'),                        # not a finding the model was trained on
    (dict(findings='Pleural Effusion'), 'findings'),                   # synonym of a known one: still refused
    (dict(findings=['nodule', 'mass']), 'findings'),                   # two entries for three images
    (dict(mask=torch.ones(1, 16, 16)), 'mask'),                        # mask not at the image size
    (dict(mask=torch.ones(1, 2, 32, 32)), 'mask'),                     # two channels
    (dict(image=torch.zeros(2, 1, 64, 64), mask=torch.ones(64, 64)), 'image'),   # image not at the model size
    (dict(image=torch.zeros(2, 3, 32, 32)), 'image'),                  # RGB
    (dict(image=torch.full((1, 32, 32), 200.)), 'image'),              # 0-255, not [-1, 1]
    (dict(mask=torch.zeros(32, 32)), 'mask'),                          # empty mask: nothing to inpaint
    (dict(mask=torch.stack([torch.ones(1, 32, 32), torch.zeros(1, 32, 32), torch.ones(1, 32, 32)])), 'mask'),
    (dict(guidance={'text': 2.0}), 'text'),                            # guidance on a condition the model lacks
    (dict(guidance={'labels': 'high'}), 'labels'),
    (dict(jump_length=20, steps=10), 'jump_length'),
    (dict(steps=0), 'steps'),
    (dict(dilate=-1), 'dilate'),
    (dict(dilate=1, feather=2), 'feather'),                            # a ramp wider than the ring would eat into the lesion
    (dict(feather=-1), 'feather'),
    (dict(mask_condition='no'), 'mask_condition'),
    (dict(seed=[1, 2]), 'seed'),
    (dict(mixed_precision='fp8'), 'mixed_precision'),
])
def test_bad_requests_fail_before_compute(tiny, data, kw, field, monkeypatch):
    model, ns = tiny
    img, mask = data
    calls = []
    monkeypatch.setattr(model, 'forward', lambda *a, **k: calls.append(1))
    args = dict(image=img, mask=mask, findings='nodule') | kw
    with pytest.raises(InpaintingError) as e: insert_lesion(model, ns, **args, **QUICK if 'steps' not in kw else {})
    assert e.value.field == field and f"'{field}'" in str(e.value) and isinstance(e.value, CXRDataError)
    assert not calls

def test_blend_keeps_the_outside_bit_for_bit_and_ramps_monotonically():
    g = torch.Generator().manual_seed(0)
    film, edit = torch.rand(2, 1, 24, 24, generator=g) * 2 - 1, torch.rand(2, 1, 24, 24, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 24, 24); mask[0, :, 8:14, 9:15] = 1; mask[1, :, 0:5, 0:6] = 1   # the second at the film's corner
    region = lesion_region(mask, 3)
    for feather in (0, 1, 2, 3):
        out, a = blend_into(film, edit, region, feather), blend_alpha(region, feather)
        assert torch.equal(out[region < .5], film[region < .5])                # outside: the film itself
        assert torch.equal(out[mask > .5], edit[mask > .5])                    # the lesion mask: the edit itself (feather <= dilate)
        assert ((a >= 0) & (a <= 1)).all() and torch.equal(a[region < .5], torch.zeros(int((region < .5).sum())))
        lo, hi = torch.minimum(film, edit), torch.maximum(film, edit)
        assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()               # a convex mix, nowhere an overshoot
        row = a[0, 0, 11, :12]                                                 # from outside (x < 6) into the mask (x >= 9)
        assert (row.diff() >= 0).all() and row[5] == 0 and row[9] == 1
        assert a[1, 0, 0, 0] == 1                                              # the film's edge is not a border
    assert torch.equal(blend_into(film, edit, region, 0), torch.where(region > .5, edit, film))   # feather 0: the hard paste
    r1 = blend_alpha(region, 3)[0, 0, 11]
    assert 0 < r1[6] < r1[7] < r1[8] < 1                                       # three ring pixels, strictly rising
    nan = torch.full_like(edit, float('nan'))
    assert torch.equal(blend_into(film, nan, region, 2)[region < .5], film[region < .5])
    with pytest.raises(InpaintingError, match="'edit'"): blend_into(film, edit[:, :, :20], region)
    with pytest.raises(InpaintingError, match="'feather'"): blend_alpha(region, -1)

def test_feather_blends_the_ring_only_and_healthy_twin_gets_an_empty_mask(tiny, data):
    model, ns = tiny
    img, mask = data
    hard = insert_lesion(model, ns, img[:2], mask, 'nodule', seed=[1, 2], dilate=2, feather=0, **QUICK)
    soft = insert_lesion(model, ns, img[:2], mask, 'nodule', seed=[1, 2], dilate=2, **QUICK)   # feather = dilate
    assert soft.feather == 2 and hard.feather == 0
    inside, ring = soft.mask > .5, (soft.region > .5) & (soft.mask < .5)
    assert torch.equal(soft.images[inside], hard.images[inside])             # the same edit on the lesion
    a = blend_alpha(soft.region, 2)
    assert torch.allclose(soft.images[ring], (a * hard.images + (1 - a) * img[:2])[ring], atol=1e-6)
    assert torch.equal(soft.images[soft.region < .5], img[:2][soft.region < .5])
    seen, forward = [], model.forward
    def spy(*a, **k):
        seen.append(k.get('mask')); return forward(*a, **k)
    model.forward = spy
    try: healthy = insert_lesion(model, ns, img[:1], mask, '', seed=1, mask_condition=False, **QUICK)
    finally: del model.forward
    assert seen and all(m is not None and m.abs().sum() == 0 for m in seen)   # told: no lesion anywhere
    assert healthy.labels.sum() == 0 and torch.equal(healthy.region, lesion_region(healthy.mask, 2))   # the same region regenerated

def test_error_names_the_synonym(tiny, data):
    model, ns = tiny
    img, mask = data
    with pytest.raises(InpaintingError, match="did you mean 'effusion'"):
        insert_lesion(model, ns, img, mask, 'Pleural Effusion', **QUICK)

def test_model_without_mask_or_labels(data):
    img, mask = data
    ucfg = unet_preset('tiny')
    m = ConditionalDenoiser(ucfg, ConditioningConfig(use_labels=False, mask_mode=None)).eval()
    ns = make_noise_scheduler(ucfg)
    with pytest.raises(InpaintingError, match='no label conditioning'): insert_lesion(m, ns, img, mask, 'nodule', **QUICK)
    res = insert_lesion(m, ns, img[:1], mask, [], **QUICK)                 # plain (unconditional) inpainting still works
    assert torch.equal(res.images[res.region < .5], img[:1][res.region < .5])

def test_psnr_outside_matches_skimage():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 20, 24, generator=g) * 2 - 1
    m = (torch.rand(3, 1, 20, 24, generator=g) > .7).float()
    b = (a + .05 * torch.randn(a.shape, generator=g) + m * .8).clamp(-1, 1)
    p = psnr_outside(a, b, m)
    for i in range(3):
        o = m[i, 0] < .5
        ref = peak_signal_noise_ratio(a[i, 0][o].numpy().astype(np.float64), b[i, 0][o].numpy().astype(np.float64), data_range=2.0)
        assert abs(p[i] - ref) < 1e-6
    single = psnr_outside(a[0], b[0], m[0])
    assert isinstance(single, float) and abs(single - p[0]) < 1e-9
    assert psnr_outside(a, a + m, m).tolist() == [np.inf] * 3
    assert abs(psnr_outside(a[0, 0].numpy(), b[0, 0].numpy(), m[0, 0].numpy(), data_range=1.0) - (p[0] - 20 * np.log10(2))) < 1e-6

def test_change_and_seam():
    a = torch.zeros(1, 1, 10, 10)
    m = torch.zeros(1, 1, 10, 10); m[..., 3:6, 3:6] = 1
    assert change_inside(a, a + .3 * m, m)[0] == pytest.approx(.3)
    assert seam_gradient(a + m, m)[0] == pytest.approx(1.)
    assert seam_gradient(a + m, lesion_region(m, 1))[0] == 0             # the jump lies inside the dilated region
    smooth = torch.linspace(0, 1, 10).expand(1, 1, 10, 10)
    assert seam_gradient(smooth, m)[0] == pytest.approx(1 / 9 * 6 / 12, rel=1e-6)

def test_metrics_table_and_figure(tiny, data):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    model, ns = tiny
    img, mask = data
    res = insert_lesion(model, ns, img[:2], mask, 'nodule', **QUICK)
    tab = inpainting_metrics(res.original, {'a': res.images, 'b': img[:2]}, res.mask, res.region)
    assert list(tab.method) == ['a', 'a', 'b', 'b'] and np.isinf(tab.psnr_outside_region).all()
    assert (tab[tab.method == 'b'].change_inside == 0).all()
    assert np.allclose(tab[tab.method == 'b'].seam, tab[tab.method == 'b'].seam_original)
    fig = before_after_figure(res.original, res.images, res.mask, titles=['x', 'y'], region=res.region,
                              baselines={'paste': img[:2]}, per_row=1)
    assert len([a for a in fig.axes if a.images]) == 2 * 4
    w, h = fig.get_size_inches(); assert w <= 10 and h <= 5
    plt.close(fig)
    fig = before_after_figure(res.original, res.images, res.mask, region=res.region, crop=12, per_row=2)
    assert fig.axes[0].images[0].get_array().shape == (12, 12)
    plt.close(fig)

def test_demo_model_inserts_a_brighter_nodule():
    "The shipped demo model: outside exact, and a nodule makes the masked area of a healthy image brighter on average."
    from cxr_diffusion_nbs.checkpoints import load_denoiser
    from cxr_diffusion_nbs.manifest import load_shared_subset
    from cxr_diffusion_nbs.core import sample_data_root, RARE_FINDINGS
    from cxr_diffusion_nbs.dataset import CXRDataset
    from cxr_diffusion_nbs.conditioning import ellipse_mask
    d = project_root()/'data'/'models'/'cpu64_demo'
    if not d.exists(): pytest.skip('demo model not present')
    model, ns, _ = load_denoiser(d, device='cpu')
    val = CXRDataset(load_shared_subset(sample_data_root()), findings=RARE_FINDINGS, size=64, split='val', mask_mode='union')
    healthy = [i for i in range(len(val)) if val.images.iloc[i]['no_finding'] == 1][:2]
    img = torch.stack([val[i]['image'] for i in healthy])
    mask = torch.from_numpy(ellipse_mask(64, .3, .4, .07, .07))[None]    # right mid lung
    res = insert_lesion(model, ns, img, mask, 'mass', steps=25, jump_length=5, jump_n_sample=2, seed=0, mixed_precision='bf16')
    assert torch.equal(res.images[res.region < .5], img[res.region < .5])
    inside = res.mask > .5
    gain = [(res.images[i][inside[i]] - img[i][inside[i]]).mean().item() for i in range(len(img))]
    assert np.mean(gain) > 0, gain
