"""Forward diffusion process (cxr_diffusion_nbs.forward) against diffusers' DDPMScheduler, and the lesion CNR on real data."""
import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import DDPMScheduler

from fastcore.test import test_close as close, test_eq as eq, test_fail as fails

from cxr_diffusion_nbs.core import MaskError, sample_data_root
from cxr_diffusion_nbs.forward import (NoiseSchedule, PREDICTION_TYPES, as_schedule, cnr_noise_floor, convert_prediction,
    cosine_betas, diffusers_schedule_kwargs, expected_lesion_cnr, image_correlation, lesion_cnr, lesion_cnr_curve,
    linear_betas, log_snr, make_schedule, noised_view, schedule_target, q_posterior_mean_var, q_sample, q_step,
    ring_mask, show_noised, snr, v_target,
    alpha_bar, as_timesteps, prediction_type_of, prediction_target, predicted_x0, predicted_eps)

KINDS = [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2')]

def ddpm(beta_schedule, T=1000, **kw):
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, **kw)

@pytest.fixture(scope='module')
def real_lesion():
    "A real NIH image of the bundled sample with a ChestX-Det nodule mask, 128 px, image in [-1, 1]."
    root = sample_data_root()
    seg = sorted((root/'masks').glob('*_seg_nodule.png'))[0]
    image_id = seg.name.split('_seg_')[0]
    img = Image.open(root/'images'/f'{image_id}.png').convert('L').resize((128, 128), Image.BILINEAR)
    x0 = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)
    m = torch.from_numpy(np.asarray(Image.open(seg).convert('L').resize((128, 128), Image.NEAREST)) > 127)
    assert m.any()
    return x0, m

@pytest.mark.parametrize('kind,bs', KINDS)
def test_alphas_cumprod_match_diffusers(kind, bs):
    s, ref = make_schedule(kind), ddpm(bs)
    close(s.alphas_cumprod, ref.alphas_cumprod.double(), eps=1e-5)
    close(s.betas, ref.betas.double(), eps=1e-6)
    # and the schedule read back from the scheduler
    back = NoiseSchedule.from_diffusers(ref)
    eq(back.kind, kind)
    close(back.alphas_cumprod, s.alphas_cumprod, eps=1e-5)
    eq(as_schedule(ref).num_timesteps, 1000)

@pytest.mark.parametrize('T', [50, 250])
def test_rescaled_linear_matches_diffusers_kwargs(T):
    s = make_schedule('linear', T)
    ref = DDPMScheduler(**diffusers_schedule_kwargs('linear', T))
    close(s.alphas_cumprod, ref.alphas_cumprod.double(), eps=1e-5)
    # the rescaling keeps the end of the process at (almost) pure noise, unlike the unscaled default
    assert s.alphas_cumprod[-1] < 1e-3 < DDPMScheduler(num_train_timesteps=T).alphas_cumprod[-1]
    close(make_schedule('cosine', T).alphas_cumprod, ddpm('squaredcos_cap_v2', T).alphas_cumprod.double(), eps=1e-5)

@pytest.mark.parametrize('kind,bs', KINDS)
def test_q_sample_matches_add_noise(kind, bs, real_lesion):
    x0 = real_lesion[0].expand(5, 1, 128, 128)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(5, 1, 128, 128, generator=g)
    t = torch.tensor([0, 1, 123, 600, 999])
    ref = ddpm(bs)
    close(q_sample(x0, t, noise, make_schedule(kind)), ref.add_noise(x0, noise, t), eps=1e-5)
    # scalar t and the scheduler itself as the schedule
    close(q_sample(x0, 300, noise, ref), ref.add_noise(x0, noise, torch.full((5,), 300)), eps=1e-5)

def test_loop_matches_closed_form_statistics():
    s = make_schedule('cosine', 100)
    x0 = torch.linspace(-1, 1, 64, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = x0.expand(4000, 64).clone()
    for t in range(60): x = q_step(x, t, torch.randn(x.shape, generator=g, dtype=x.dtype), s)
    ab = s.alphas_cumprod[59]
    close(x.mean(0), ab.sqrt() * x0, eps=0.06)
    close(x.std(0), (1 - ab).sqrt().expand(64), eps=0.05)

@pytest.mark.parametrize('kind,bs', KINDS)
def test_posterior_variance_matches_fixed_small(kind, bs):
    s, ref = make_schedule(kind), ddpm(bs, variance_type='fixed_small')
    var = torch.stack([ref._get_variance(t) for t in range(1000)]).double()
    close(s.posterior_variance[1:], var[1:], eps=1e-6)
    close(s.posterior_variance[0], 0.)                  # diffusers clamps this to 1e-20
    x0, xt = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    mean, v = q_posterior_mean_var(x0, xt, torch.tensor([5, 700]), s)
    eq(v.shape, (2, 1, 1, 1))
    close(v.flatten(), var[[5, 700]].float(), eps=1e-6)

@pytest.mark.parametrize('kind,bs', KINDS)
def test_posterior_mean_is_ddpm_step_with_true_x0(kind, bs):
    ref = ddpm(bs, variance_type='fixed_small', prediction_type='sample', clip_sample=False)
    x0, noise = torch.rand(1, 1, 16, 16) * 2 - 1, torch.randn(1, 1, 16, 16)
    t = 400
    xt = ref.add_noise(x0, noise, torch.tensor([t]))
    out = ref.step(x0, t, xt, generator=torch.Generator().manual_seed(3)).prev_sample
    z = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    mean, var = q_posterior_mean_var(x0, xt, t, make_schedule(kind))
    close(mean + var.sqrt() * z, out, eps=1e-4)

@pytest.mark.parametrize('kind,bs', KINDS)
def test_v_target_and_conversions(kind, bs, real_lesion):
    ref, s = ddpm(bs, prediction_type='v_prediction'), make_schedule(kind)
    x0 = real_lesion[0].expand(4, 1, 128, 128)
    noise = torch.randn(4, 1, 128, 128, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 250, 500, 900])
    close(v_target(x0, noise, t, s), ref.get_velocity(x0, noise, t), eps=1e-5)
    xt = q_sample(x0, t, noise, s)
    truth = {p: schedule_target(x0, noise, t, s, p) for p in PREDICTION_TYPES}
    for src in PREDICTION_TYPES:
        for dst in PREDICTION_TYPES:
            close(convert_prediction(truth[src], xt, t, s, src, dst), truth[dst], eps=2e-3)
    fails(lambda: convert_prediction(noise, xt, t, s, 'eps', 'sample'), contains='prediction type')

@pytest.mark.parametrize('kind,bs', KINDS)
@pytest.mark.parametrize('pt', PREDICTION_TYPES)
def test_hot_path_maths_match_the_float64_lesson(kind, bs, pt, real_lesion):
    "The float32 scheduler-based functions agree with the float64 NoiseSchedule versions, in every direction."
    ref, s = ddpm(bs, prediction_type=pt), make_schedule(kind)
    x0 = real_lesion[0].expand(4, 1, 128, 128)
    noise = torch.randn(4, 1, 128, 128, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 250, 500, 900])
    eq(prediction_type_of(ref), pt)
    close(alpha_bar(t, ref, x0).double().flatten(), s.alphas_cumprod[t], eps=1e-6)
    xt = q_sample(x0, t, noise, s).float()
    target = prediction_target(x0, noise, t, ref)
    eq(target.dtype, torch.float32)
    close(target, schedule_target(x0, noise, t, s, pt).float(), eps=1e-5)
    close(predicted_x0(target, xt, t, ref), convert_prediction(target.double(), xt.double(), t, s, pt, 'sample').float(), eps=1e-3)
    close(predicted_eps(target, xt, t, ref), convert_prediction(target.double(), xt.double(), t, s, pt, 'epsilon').float(), eps=1e-3)
    close(predicted_x0(target, xt, t, ref), x0, eps=1e-3)
    close(predicted_eps(target, xt, t, ref), noise, eps=2e-3)

def test_hot_path_timesteps_and_dtypes():
    ref = ddpm('linear', T=10)
    x = torch.zeros(3, 1, 4, 4, dtype=torch.bfloat16)
    eq(as_timesteps(4, 3, ref), torch.tensor([4, 4, 4]))
    eq(as_timesteps(torch.tensor([1., 2., 3.]), 3, ref, device='cpu').dtype, torch.long)
    eq(alpha_bar(torch.tensor(2), ref, x).shape, (3, 1, 1, 1))
    eq(alpha_bar(2, ref, x).dtype, torch.float32)                     # float32 whatever the image dtype
    eq(predicted_x0(x, x, 2, ref).dtype, torch.bfloat16)               # conversions keep the prediction's dtype
    fails(lambda: as_timesteps(torch.tensor([1.5, 2., 3.]), 3, ref), contains='integers')
    fails(lambda: as_timesteps(10, 3, ref), contains='[0, 9]')
    fails(lambda: as_timesteps([1, 2], 3, ref), contains='one timestep per sample')
    fails(lambda: prediction_type_of(object()), contains='prediction_type')

def test_snr():
    s = make_schedule('linear')
    close(snr(s), s.alphas_cumprod / (1 - s.alphas_cumprod), eps=1e-9)
    close(log_snr(s, torch.tensor([3, 500])), snr(s, torch.tensor([3, 500])).log(), eps=1e-9)
    # the cosine schedule keeps more signal early on
    assert (make_schedule('cosine').alphas_cumprod[50:900] > s.alphas_cumprod[50:900]).all()

def test_bad_inputs():
    fails(lambda: make_schedule('quadratic'), contains='linear')
    fails(lambda: make_schedule('linear', 10), contains='(0, 1)')
    fails(lambda: q_sample(torch.zeros(2, 4), 1000, torch.zeros(2, 4), 'linear'), contains='out of range')
    fails(lambda: NoiseSchedule(torch.tensor([0.1, 1.0])), contains='(0, 1)')

def test_ring_and_cnr_on_synthetic_square():
    x = torch.zeros(64, 64); m = torch.zeros(64, 64, dtype=torch.bool); m[20:30, 20:30] = True
    r = ring_mask(m, width=3, gap=1)
    eq(int(r.sum()), 18 * 18 - 12 * 12)
    assert not (r & m).any()
    x[m] = 1.0
    x += 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    c = lesion_cnr(x, m)
    assert 8 < c < 12                                          # contrast 1, noise 0.1
    eq(lesion_cnr(torch.stack([x, x, x]), m[None]).shape, (3,))
    fails(lambda: lesion_cnr(x, torch.zeros(64, 64)), contains='empty')
    fails(lambda: lesion_cnr(x, torch.ones(64, 64)), contains='ring')
    assert isinstance(pytest.raises(MaskError, lesion_cnr, x, torch.ones(32, 32)).value, MaskError)

def test_cnr_curve_on_real_lesion(real_lesion):
    x0, m = real_lesion
    ts = torch.tensor([0, 50, 100, 200, 400, 999])
    for kind in ('linear', 'cosine'):
        c = lesion_cnr_curve(x0, m, kind, ts, n_noise=16, seed=0)
        eq(c.shape, (6,))
        ex = expected_lesion_cnr(x0, m, kind, ts)
        close(c[:2], ex[:2], eps=0.15 * ex[0].item())      # Monte Carlo agrees with the formula while visible
        close(c[-1].item(), cnr_noise_floor(m), eps=0.1)  # only chance contrast left at the end
        assert c[0] > 3 * c[-1]
        eq(lesion_cnr_curve(x0, m, kind, ts, n_noise=4, seed=1), lesion_cnr_curve(x0, m, kind, ts, n_noise=4, seed=1))
    lin, cos = (lesion_cnr_curve(x0, m, k, torch.tensor([150]), n_noise=16) for k in ('linear', 'cosine'))
    assert cos > lin                                           # the cosine schedule destroys the lesion later

def test_image_correlation(real_lesion):
    x0 = real_lesion[0]
    close(image_correlation(x0, x0), 1.0)
    noise = torch.randn(8, 128, 128, generator=torch.Generator().manual_seed(0))
    assert abs(image_correlation(noise, x0)).max() < 0.05

def test_noised_view_and_plot(real_lesion):
    x0, m = real_lesion
    img, cnr = noised_view(x0, m, 'linear', 300, seed=7)
    eq(img.shape, (128, 128)); eq(img.dtype, np.float32)
    noise = torch.randn(128, 128, generator=torch.Generator().manual_seed(7))
    close(img, q_sample(x0, 300, noise, 'linear').numpy(), eps=1e-6)
    close(cnr, float(lesion_cnr(torch.from_numpy(img), m)), eps=1e-9)
    img2, _ = noised_view(x0.numpy()[None], m.numpy(), 'linear', 300, seed=7)   # numpy (1, H, W) input
    close(img2, img, eps=1e-6)
    assert noised_view(x0, m, 'cosine', 999, seed=0)[1] < noised_view(x0, m, 'cosine', 0, seed=0)[1]
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    ax = show_noised(x0, m, 'cosine', 200, seed=0, show_mask=True)
    assert 'cosine t=200' in ax.get_title() and len(ax.images) == 1
    plt.close('all')

def test_device_and_dtype_follow_input():
    x0 = torch.zeros(2, 1, 4, 4, dtype=torch.float16)
    out = q_sample(x0, torch.tensor([1, 2]), torch.ones_like(x0), 'cosine')
    eq(out.dtype, torch.float16)
    eq(cosine_betas(10).dtype, torch.float64); eq(linear_betas(10, 1e-4, 0.02).dtype, torch.float64)
