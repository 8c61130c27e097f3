"""ILVR reference guidance: the low-pass filter, weight maps, patch preparation, the sampler hook (exact properties on a
tiny untrained model, the real effect on the committed demo model) and input checks that fire before any compute."""
import numpy as np, torch, pytest
from skimage.exposure import equalize_hist, match_histograms
from cxr_diffusion_nbs.core import project_root, CXRDataError
from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, ConditioningConfig
from cxr_diffusion_nbs.unet import unet_preset, make_noise_scheduler
from cxr_diffusion_nbs.sampling import sample
from cxr_diffusion_nbs.ilvr import (ILVRError, ILVRReference, low_pass, check_factor, gaussian_patch_weight, box_from_mask,
                                   complement_weight, prepare_patch, ilvr_hook, ilvr_sample, ilvr_sweep, lowpass_correlation,
                                   lesion_conditions, anatomy_patch_references, ilvr_figure, check_references)

DEMO = project_root()/'data'/'models'/'cpu64_demo'

@pytest.fixture(scope='module')
def tiny():
    cfg = unet_preset('tiny')
    return ConditionalDenoiser(cfg, ConditioningConfig()).eval(), make_noise_scheduler(cfg)

def _ref(size=32, seed=1):
    return low_pass(torch.randn(1, size, size, generator=torch.Generator().manual_seed(seed)), 4).clamp(-1, 1)

def _no_compute(model):
    "The model, made to fail loudly if anything calls its forward."
    def boom(*a, **k): raise AssertionError('the model was called before the input check')
    model.forward = boom
    return model

# --- low-pass filter ---------------------------------------------------------------------------------------------
def test_low_pass_properties():
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    const = torch.full((2, 1, 32, 32), -.4)
    for N in (2, 4, 8, 16, 32): torch.testing.assert_close(low_pass(const, N), const)
    assert torch.equal(low_pass(x, 1), x)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2. - 1)[None, None]
    assert low_pass(checker, 2).abs().max() < 1e-6                      # the finest pattern is removed entirely
    # high frequencies go: the residual of noise carries most of its energy, more so for larger N
    res = [(x - low_pass(x, N)).pow(2).mean().item() / x.pow(2).mean().item() for N in (2, 4, 8)]
    assert res[0] > .6 and res[0] < res[1] < res[2]
    assert abs(low_pass(x, 4).mean() - x.mean()) < 1e-2                 # brightness kept
    assert low_pass(x[0, 0], 4).shape == (32, 32)                       # any leading dims

@pytest.mark.parametrize('factor', [0, -2, 3, 1.5, True, '4'])
def test_bad_factor_names_the_field(factor):
    with pytest.raises(ILVRError, match="'factor'"): low_pass(torch.zeros(1, 1, 32, 32), factor)
    with pytest.raises(ILVRError, match="'factor'"): ILVRReference(torch.zeros(32, 32), factor=factor)

def test_check_factor_lists_valid_choices():
    with pytest.raises(ILVRError, match=r'\[1, 2, 4, 8, 16, 32\]'): check_factor(5, (32, 32))

# --- weights, boxes, patches -------------------------------------------------------------------------------------
def test_gaussian_weight_zero_outside_peak_inside():
    box = (10, 20, 24, 30)
    w = gaussian_patch_weight((64, 64), box, peak=.8)
    inside = torch.zeros(64, 64, dtype=torch.bool); inside[20:30, 10:24] = True
    assert w[~inside].abs().max() == 0
    assert abs(w.max().item() - .8) < 1e-6 and w.min() >= 0
    iy, ix = divmod(int(w.argmax()), 64)
    assert 24 <= iy <= 25 and 16 <= ix <= 17                           # the peak is at the box centre
    assert w[20, 10] < .05 * w.max()                                    # ~0 at the corner (sigma = side / 6)
    torch.testing.assert_close(complement_weight(w) + w, torch.ones(64, 64))

@pytest.mark.parametrize('box', [(0, 0, 0, 5), (10, 10, 70, 20), (-1, 0, 5, 5), 'abc', (1, 2, 3)])
def test_bad_box(box):
    with pytest.raises(ILVRError, match="'box'"): gaussian_patch_weight((64, 64), box)

def test_bad_peak_and_sigma():
    with pytest.raises(ILVRError, match="'peak'"): gaussian_patch_weight((64, 64), (1, 1, 9, 9), peak=1.5)
    with pytest.raises(ILVRError, match="'sigma'"): gaussian_patch_weight((64, 64), (1, 1, 9, 9), sigma=0)

def test_box_from_mask():
    m = np.zeros((64, 64)); m[10:15, 30:41] = 1
    assert box_from_mask(m) == (30, 10, 41, 15)
    assert box_from_mask(torch.as_tensor(m)[None], margin=3) == (27, 7, 44, 18)
    m2 = np.zeros((64, 64)); m2[0:2, 62:64] = 1
    assert box_from_mask(m2, margin=5) == (57, 0, 64, 7)               # clipped to the image
    with pytest.raises(ILVRError, match="'mask'"): box_from_mask(np.zeros((64, 64)))

def test_prepare_patch_matches_anatomy_region():
    g = torch.Generator().manual_seed(0)
    anatomy = low_pass(torch.rand(1, 64, 64, generator=g) * 2 - 1, 2)[0]
    box = (20, 10, 36, 30)
    x0, y0, x1, y1 = box
    patch = (.25 * torch.randn(y1 - y0, x1 - x0, generator=g) + .3).clamp(-1, 1)    # differently distributed
    out = prepare_patch(patch, anatomy, box)
    region = anatomy[y0:y1, x0:x1].numpy()
    expected = match_histograms(equalize_hist((patch.numpy() + 1) / 2, nbins=patch.numel()) * 2 - 1, region)
    np.testing.assert_allclose(out[y0:y1, x0:x1].numpy(), expected, atol=1e-6)   # = skimage's equalise + match
    qs = [.05, .25, .5, .75, .95]
    np.testing.assert_allclose(np.quantile(out[y0:y1, x0:x1].numpy(), qs), np.quantile(region, qs), atol=.03)
    keep = torch.ones(64, 64, dtype=torch.bool); keep[y0:y1, x0:x1] = False
    assert torch.equal(out[keep], anatomy[keep])                                   # the anatomy elsewhere
    # the patch's structure (rank order) survives the matching
    from scipy.stats import spearmanr
    assert spearmanr(out[y0:y1, x0:x1].numpy().ravel(), patch.numpy().ravel())[0] > .99
    with pytest.raises(ILVRError, match="'patch'"): prepare_patch(patch[1:], anatomy, box)
    with pytest.raises(ILVRError, match="'box'"): prepare_patch(patch, anatomy, (50, 50, 66, 70))

# --- the sampler hook: exact properties on a tiny model ----------------------------------------------------------
def test_stop_at_T_is_plain_sampling_exactly(tiny):
    model, sched = tiny
    plain = sample(model, sched, n=2, steps=8, seed=5).images
    out = ilvr_sample(model, sched, ILVRReference(_ref(), 4, stop_t=1000), n=2, steps=8, seed=5).images
    assert torch.equal(out, plain)

def test_same_seed_same_images(tiny):
    model, sched = tiny
    refs = anatomy_patch_references(_ref(), _ref(seed=2), (8, 8, 20, 20), factor=4, stop_t=300)
    a = ilvr_sample(model, sched, refs, n=2, steps=8, seed=[3, 4]).images
    b = ilvr_sample(model, sched, refs, n=2, steps=8, seed=[3, 4]).images
    c = ilvr_sample(model, sched, refs, n=2, steps=8, seed=[5, 6]).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    one = ilvr_sample(model, sched, refs, n=1, steps=8, seed=[4]).images      # image 1 alone: same image
    torch.testing.assert_close(one[0], a[1], atol=1e-4, rtol=0)

def test_hook_is_reusable_and_stateless(tiny):
    model, sched = tiny
    hook = ilvr_hook(ILVRReference(_ref(), 4, 0), sched, seed=0)
    a = sample(model, sched, n=1, steps=6, seed=0, step_hook=hook).images
    b = sample(model, sched, n=1, steps=6, seed=0, step_hook=hook).images
    assert torch.equal(a, b)

def test_factor_1_stop_0_returns_the_reference(tiny):
    model, sched = tiny
    y = _ref()
    out = ilvr_sample(model, sched, ILVRReference(y, 1, 0), n=2, steps=6).images
    torch.testing.assert_close(out, y[None].expand(2, -1, -1, -1), atol=1e-5, rtol=0)

def test_stop_step_semantics_and_record(tiny):
    model, sched = tiny
    rec = []
    refs = [ILVRReference(_ref(), 4, 600, .5, 'early'), ILVRReference(_ref(seed=3), 2, 0, .5, 'late')]
    ilvr_sample(model, sched, refs, n=1, steps=10, record=rec)
    assert len(rec) == 10 and rec[-1]['t_prev'] == -1
    for r in rec:
        assert ('early' in r['active']) == (r['t'] >= 600) and 'late' in r['active']

def test_shared_noise_split_weights_equal_one_reference(tiny):
    "Two copies of a reference with weights w and 1 - w act as one reference of weight 1 (same noise for both)."
    model, sched = tiny
    y = _ref()
    w = gaussian_patch_weight((32, 32), (4, 4, 28, 28))
    one = ilvr_sample(model, sched, ILVRReference(y, 4, 200), n=2, steps=8, seed=1).images
    two = ilvr_sample(model, sched, [ILVRReference(y, 4, 200, w), ILVRReference(y, 4, 200, complement_weight(w))],
                      n=2, steps=8, seed=1).images
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)

def test_weight_zero_leaves_images_alone(tiny):
    model, sched = tiny
    plain = sample(model, sched, n=2, steps=6, seed=2).images
    w = torch.zeros(2, 1, 32, 32); w[1] = 1                                  # per-image weights: only image 1
    out = ilvr_sample(model, sched, ILVRReference(_ref(), 4, 0, w), n=2, steps=6, seed=2).images
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])

def test_sweep_matches_single_runs(tiny):
    model, sched = tiny
    y = _ref()
    out = ilvr_sweep(model, sched, y, [(2, 0), (8, 500)], seeds=(0, 1), steps=6)
    assert out.shape == (2, 2, 1, 32, 32)
    single = ilvr_sample(model, sched, ILVRReference(y, 8, 500), n=2, steps=6, seed=[0, 1]).images
    torch.testing.assert_close(out[1], single, atol=1e-4, rtol=0)
    with pytest.raises(ILVRError, match="'settings"): ilvr_sweep(model, sched, y, [(2,)])

def test_lesion_conditions(tiny):
    model, _ = tiny
    m = torch.zeros(32, 32); m[5:9, 5:9] = 1
    c = lesion_conditions(model, 'mass', m, n=3)
    k = model.cond_cfg.findings.index('mass')
    assert c['labels'].shape == (3, len(model.cond_cfg.findings)) and c['labels'][:, k].eq(1).all() and c['labels'].sum() == 3
    assert c['mask'].shape == (3, 1, 32, 32) and torch.equal(c['mask'][0, 0], m)
    pf = ConditionalDenoiser(unet_preset('tiny'), ConditioningConfig(mask_mode='per_finding'))
    cp = lesion_conditions(pf, 'mass', m)
    assert cp['mask'].shape == (1, len(pf.cond_cfg.findings), 32, 32) and cp['mask'][0, k].sum() == 16 and cp['mask'].sum() == 16
    with pytest.raises(ILVRError, match="'finding'"): lesion_conditions(model, 'fracture', m)
    with pytest.raises(ILVRError, match="'masks'"): lesion_conditions(model, 'mass', torch.zeros(64, 64))

def test_figure_function(tiny):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    model, sched = tiny
    refs = anatomy_patch_references(_ref(), _ref(seed=2), (8, 8, 20, 20))
    fig = ilvr_figure(model, sched, refs, n=2, steps=4, mask=torch.zeros(32, 32))
    assert len(fig.axes) == 6
    plt.close(fig)

def test_widget_builds(tiny):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import ipywidgets as W
    from cxr_diffusion_nbs.ilvr import ilvr_widget
    model, sched = tiny
    ui = ilvr_widget(model, sched, _ref(), _ref(seed=2), (8, 8, 20, 20), n=1, steps=3)
    assert isinstance(ui, W.VBox)
    sliders = ui.children[0].children
    assert [s.description for s in sliders] == ['anatomy N', 'anatomy a', 'patch']
    sliders[2].value = .5                                               # redraws through ilvr_figure
    plt.close('all')

# --- bad inputs: clear errors naming the field, before any compute -------------------------------------------------
def test_bad_inputs_raise_before_compute(tiny):
    _, sched = tiny
    model = _no_compute(ConditionalDenoiser(unet_preset('tiny'), ConditioningConfig()).eval())
    y = _ref()
    cases = [
        (lambda: ilvr_sample(model, sched, ILVRReference(torch.zeros(64, 64)), n=1), "'image'"),          # wrong size
        (lambda: ilvr_sample(model, sched, ILVRReference(torch.zeros(2, 32, 32)), n=1), "'image'"),       # channels
        (lambda: ilvr_sample(model, sched, ILVRReference(y, 4, 1001), n=1), "'stop_t'"),
        (lambda: ILVRReference(y, 4, -1), "'stop_t'"),
        (lambda: ILVRReference(y, 4, 0, torch.ones(16, 16)), "'weight'"),
        (lambda: ILVRReference(y, 4, 0, -.1), "'weight'"),
        (lambda: ILVRReference(y, 4, 0, torch.full((32, 32), 1.2)), "'weight'"),
        (lambda: ilvr_sample(model, sched, [ILVRReference(y), ILVRReference(y, weight=.3)], n=1), "'weight'"),   # sum > 1
        (lambda: ilvr_sample(model, sched, ILVRReference(y, weight=torch.ones(3, 1, 32, 32)), n=2), "'weight'"),  # batch
        (lambda: ilvr_sample(model, sched, ILVRReference(y), n=1, guidance={'text': 3.}), "'text'"),    # no text condition
        (lambda: ilvr_sample(model, sched, [], n=1), "'references'"),
        (lambda: ilvr_sample(model, sched, [y], n=1), "'references'"),
        (lambda: ilvr_sample(model, sched, [ILVRReference(y), ILVRReference(torch.zeros(16, 16), weight=0.)], n=1), "'image'"),
        (lambda: ILVRReference(torch.full((32, 32), float('nan'))), "'image'"),
    ]
    for fn, field in cases:
        with pytest.raises(CXRDataError, match=field): fn()

def test_errors_are_cxr_data_errors():
    assert issubclass(ILVRError, CXRDataError)

# --- the real effect, on the committed demo model ----------------------------------------------------------------
@pytest.fixture(scope='module')
def demo():
    from cxr_diffusion_nbs.checkpoints import load_denoiser
    from cxr_diffusion_nbs.core import sample_data_root
    from cxr_diffusion_nbs.manifest import load_shared_subset
    from cxr_diffusion_nbs.dataset import CXRDataset
    model, sched, _ = load_denoiser(DEMO, device='cpu')
    ds = CXRDataset(load_shared_subset(sample_data_root()), findings=model.cond_cfg.findings, size=64, split='val', mask_mode='union')
    healthy = [i for i in range(len(ds)) if ds.images.iloc[i]['no_finding'] == 1]
    return model, sched, ds[healthy[0]]['image']

def test_ilvr_pulls_low_frequencies_to_the_reference(demo):
    model, sched, ref = demo
    plain = sample(model, sched, n=2, steps=20, seed=0).images
    # stop at a = 300: the last steps are the model's own, so the match is not forced by the final step
    guided = ilvr_sample(model, sched, ILVRReference(ref, 8, 300), n=2, steps=20, seed=0).images
    c_plain, c_ilvr = lowpass_correlation(plain, ref, 8), lowpass_correlation(guided, ref, 8)
    assert (c_ilvr > .9).all() and c_plain.mean() < .7, (c_ilvr, c_plain)
    err = lambda x: (low_pass(x, 8) - low_pass(ref[None], 8)).pow(2).mean().item()
    assert err(guided) < err(plain) / 5
    assert guided.std() > .2                                             # a radiograph, not a flat blur
    # detail is the model's: at full resolution the sample is not a copy of the reference
    assert (lowpass_correlation(guided, ref, 1) < .995).all()

def test_smaller_factor_keeps_more_of_the_reference(demo):
    model, sched, ref = demo
    out = ilvr_sweep(model, sched, ref, [(4, 300), (16, 300)], seeds=(0,), steps=20)
    c = [lowpass_correlation(out[k], ref).item() for k in range(2)]
    assert c[0] > c[1], c

def test_check_references_against_the_demo_model(demo):
    model, sched, ref = demo
    T = sched.config.num_train_timesteps
    refs = check_references(ILVRReference(ref, 8, 300), T, model.unet_cfg.image_size, model.unet_cfg.in_channels, n=4)
    assert len(refs) == 1
    with pytest.raises(ILVRError, match="'image'"):
        check_references(ILVRReference(ref[:, :32, :32], 8, 300), T, model.unet_cfg.image_size)
