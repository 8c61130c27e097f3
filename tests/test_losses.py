"Tests of cxr_diffusion_nbs.losses (lesion-preserving diffusion loss) against hand-computed values."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from skimage.metrics import structural_similarity

from cxr_diffusion_nbs import losses
from cxr_diffusion_nbs.losses import (PREDICTION_TYPES, LesionLossConfig, lesion_bboxes, lesion_preserving_loss,
                                      lesion_weight_map, min_snr_weight, predicted_x0, snr_of, ssim, prediction_target)

OFF = LesionLossConfig(lesion_weight=0, ssim_weight=0, min_snr_gamma=None)


def sched(pt='epsilon', **kw):
    return DDPMScheduler(prediction_type=pt, **kw)


def two_step(pt):
    "A 2-step schedule with ᾱ = (0.5, 0.25), i.e. SNR = (1, 1/3): easy numbers by hand."
    return DDPMScheduler(num_train_timesteps=2, trained_betas=[0.5, 0.5], prediction_type=pt)


def batch(B=3, C=1, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, W, generator=g) * 2 - 1
    noise = torch.randn(B, C, H, W, generator=g)
    return x0, noise, g


# ---------------------------------------------------------------- targets and predicted x0
def test_prediction_target_each_prediction_type():
    x0, noise, _ = batch()
    t = torch.tensor([0, 1, 1])
    torch.testing.assert_close(prediction_target(x0, noise, t, two_step('epsilon')), noise)
    torch.testing.assert_close(prediction_target(x0, noise, t, two_step('sample')), x0)
    ac = torch.tensor([0.5, 0.25, 0.25]).view(3, 1, 1, 1)
    v = ac.sqrt() * noise - (1 - ac).sqrt() * x0          # Salimans & Ho 2022, by hand
    torch.testing.assert_close(prediction_target(x0, noise, t, two_step('v_prediction')), v)


def test_unknown_prediction_type_is_a_clear_error():
    x0, noise, _ = batch()
    s = DDPMScheduler(prediction_type='flow_matching')
    with pytest.raises(ValueError, match=r"scheduler.config.prediction_type: 'flow_matching'"):
        prediction_target(x0, noise, 0, s)
    with pytest.raises(ValueError, match='prediction_type'):
        predicted_x0(x0, x0, 0, s)
    with pytest.raises(ValueError, match='prediction_type'):
        lesion_preserving_loss(x0, x0, x0, noise, 0, None, s, OFF)


@pytest.mark.parametrize('pt', PREDICTION_TYPES)
def test_predicted_x0_inverts_the_forward_process(pt):
    x0, noise, _ = batch()
    s = sched(pt, beta_schedule='squaredcos_cap_v2')
    t = torch.tensor([0, 300, 700])
    x_t = s.add_noise(x0, noise, t)
    torch.testing.assert_close(predicted_x0(prediction_target(x0, noise, t, s), x_t, t, s), x0, atol=1e-4, rtol=1e-4)


def test_predicted_x0_by_hand():
    x_t, p = torch.full((1, 1, 2, 2), 0.6), torch.full((1, 1, 2, 2), 0.2)
    t = torch.tensor([1])                                  # ᾱ = 0.25
    torch.testing.assert_close(predicted_x0(p, x_t, t, two_step('epsilon')), torch.full_like(x_t, (0.6 - math.sqrt(0.75) * 0.2) / 0.5))
    torch.testing.assert_close(predicted_x0(p, x_t, t, two_step('v_prediction')), torch.full_like(x_t, 0.5 * 0.6 - math.sqrt(0.75) * 0.2))
    torch.testing.assert_close(predicted_x0(p, x_t, t, two_step('sample')), p)


def test_timesteps_are_checked():
    x0, noise, _ = batch()
    with pytest.raises(ValueError, match=r't: timesteps must lie in \[0, 1\]'):
        predicted_x0(x0, x0, 2, two_step('epsilon'))
    with pytest.raises(ValueError, match='one timestep per sample'):
        lesion_preserving_loss(x0, x0, x0, noise, torch.tensor([0, 1]), None, two_step('sample'), OFF)


# ---------------------------------------------------------------- weight map
def test_lesion_weight_map_union_and_none():
    m = torch.zeros(2, 3, 3, 3)
    m[0, 0, 0, 0] = 1; m[0, 2, 0, 0] = 1; m[0, 1, 2, 2] = 1; m[1, 2, 1, 1] = 0.25
    w = lesion_weight_map(m, 4.0)
    assert w.shape == (2, 1, 3, 3)
    torch.testing.assert_close(w[0, 0], torch.tensor([[5., 1, 1], [1, 1, 1], [1, 1, 5]]))
    torch.testing.assert_close(w[1, 0], torch.tensor([[1., 1, 1], [1, 2, 1], [1, 1, 1]]))
    torch.testing.assert_close(lesion_weight_map(m, 0.0), torch.ones(2, 1, 3, 3))
    torch.testing.assert_close(lesion_weight_map(None, 4.0, like=torch.zeros(2, 5, 4, 6)), torch.ones(2, 1, 4, 6))
    assert lesion_weight_map(None, 4.0).shape == (1, 1, 1, 1)


# ---------------------------------------------------------------- weighted MSE by hand
def test_weighted_mse_tiny_by_hand():
    s = sched('sample')
    x0 = torch.zeros(1, 1, 2, 2)
    pred = torch.tensor([[[[1., 2.], [0., 0.]]]], requires_grad=True)
    mask = torch.tensor([[[[1., 0.], [0., 0.]]]])
    cfg = LesionLossConfig(lesion_weight=4, ssim_weight=0, min_snr_gamma=None)
    loss, parts = lesion_preserving_loss(pred, x0, x0, torch.zeros_like(x0), 10, mask, s, cfg)
    assert loss.item() == pytest.approx(9 / 8)              # (5*1 + 1*4) / (5+1+1+1)
    assert parts['mse'] == pytest.approx(5 / 4) and parts['lesion_mse'] == pytest.approx(1.0)
    assert parts['ssim'] == 0.0 and parts['total'] == pytest.approx(9 / 8) and parts['diffusion'] == pytest.approx(9 / 8)
    loss.backward()
    torch.testing.assert_close(pred.grad[0, 0], torch.tensor([[10 / 8, 4 / 8], [0., 0.]]))


def test_weighted_mse_two_samples_two_channels_by_hand():
    s = sched('epsilon')
    noise = torch.zeros(2, 2, 2, 2)                         # target = noise = 0, so error = pred
    pred = torch.zeros(2, 2, 2, 2)
    pred[0, 0, 0, 0] = 1; pred[0, 1, 1, 1] = 2              # sample 0: e² 1 at (0,0) ch0, 4 at (1,1) ch1
    pred[1, :, 0, 1] = 3                                    # sample 1: e² 9 at (0,1) both channels
    mask = torch.zeros(2, 1, 2, 2); mask[0, 0, 0, 0] = 1; mask[1, 0, 1, 0] = 1
    cfg = LesionLossConfig(lesion_weight=2, ssim_weight=0, min_snr_gamma=None)
    loss, parts = lesion_preserving_loss(pred, pred, pred, noise, 5, mask, s, cfg)
    l0 = (3 * 1 + 1 * 4) / (2 * (3 + 1 + 1 + 1))            # weights 3,1,1,1 ; C=2
    l1 = (1 * 9 + 1 * 9) / (2 * 6)
    assert loss.item() == pytest.approx((l0 + l1) / 2)
    assert parts['mse'] == pytest.approx((1 + 4 + 18) / 16)
    assert parts['lesion_mse'] == pytest.approx((1 + 0 + 0 + 0) / 4)   # lesion pixels (both channels): 1,0 | 0,0


@pytest.mark.parametrize('pt', PREDICTION_TYPES)
@pytest.mark.parametrize('with_mask', [True, False])
def test_all_off_is_exactly_mse(pt, with_mask):
    x0, noise, g = batch(B=4, C=1, H=16, W=16)
    s = sched(pt, beta_schedule='squaredcos_cap_v2')
    t = torch.randint(0, 1000, (4,), generator=g)
    x_t, pred = s.add_noise(x0, noise, t), torch.randn(4, 1, 16, 16, generator=g)
    mask = (torch.rand(4, 2, 16, 16, generator=g) > 0.8).float() if with_mask else None
    loss, parts = lesion_preserving_loss(pred, x0, x_t, noise, t, mask, s, OFF)
    assert torch.equal(loss, F.mse_loss(pred, prediction_target(x0, noise, t, s)))
    assert parts['total'] == pytest.approx(parts['mse'])
    # lesion weighting on but no mask: plain MSE too; a mask of zeros: the same value
    cfg = LesionLossConfig(lesion_weight=4, ssim_weight=0.5, min_snr_gamma=None)
    ref = F.mse_loss(pred, prediction_target(x0, noise, t, s))
    assert lesion_preserving_loss(pred, x0, x_t, noise, t, None, s, cfg)[0].item() == pytest.approx(ref.item(), rel=1e-6)
    zeros = torch.zeros(4, 1, 16, 16)
    assert lesion_preserving_loss(pred, x0, x_t, noise, t, zeros, s, cfg)[0].item() == pytest.approx(ref.item(), rel=1e-6)


def test_ssim_weight_zero_skips_the_ssim_computation(monkeypatch):
    def boom(*a, **k): raise AssertionError('SSIM must not be computed when ssim_weight == 0')
    monkeypatch.setattr(losses, 'ssim', boom)
    monkeypatch.setattr(losses, 'predicted_x0', boom)
    x0, noise, _ = batch()
    mask = torch.zeros(3, 1, 16, 16); mask[:, :, 4:8, 4:8] = 1
    s = sched('epsilon')
    loss, parts = lesion_preserving_loss(torch.randn_like(x0), x0, x0, noise, 10, mask, s,
                                         LesionLossConfig(ssim_weight=0))
    assert parts['ssim'] == 0.0 and torch.isfinite(loss)
    with pytest.raises(AssertionError, match='must not be computed'):   # and it is computed otherwise
        lesion_preserving_loss(torch.randn_like(x0), x0, x0, noise, 10, mask, s, LesionLossConfig(ssim_weight=0.1))


# ---------------------------------------------------------------- min-SNR
def test_min_snr_weights_for_known_snr():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0, math.inf])
    torch.testing.assert_close(min_snr_weight(snr, 5, 'epsilon'), torch.tensor([1, 1, 1, 0.25, 0]))
    torch.testing.assert_close(min_snr_weight(snr, 5, 'v_prediction'), torch.tensor([0, 0.5 / 1.5, 5 / 6, 5 / 21, 0]))
    torch.testing.assert_close(min_snr_weight(snr, 5, 'sample'), torch.tensor([0, 0.5, 5, 5, 5]))
    with pytest.raises(ValueError, match='prediction_type'):
        min_snr_weight(snr, 5, 'eps')


def test_snr_of_scheduler():
    torch.testing.assert_close(snr_of(torch.tensor([0, 1]), two_step('epsilon')), torch.tensor([1.0, 1 / 3]))
    s = sched('epsilon')                                    # linear: ᾱ_0 = 1 - 1e-4
    assert snr_of(0, s).item() == pytest.approx((1 - 1e-4) / 1e-4, rel=1e-3)


@pytest.mark.parametrize('pt,gamma,floor,weights', [('epsilon', 0.5, None, (0.5, 1.0)), ('v_prediction', 0.5, None, (0.25, 0.25)),
                                                     ('sample', 0.5, None, (0.5, 1 / 3)), ('epsilon', 5, 1, (1.0, 3.0)),
                                                     ('v_prediction', 5, 1, (0.5, 0.75)), ('sample', 5, 1, (1.0, 1.0))])
def test_min_snr_loss_by_hand(pt, gamma, floor, weights):
    # SNR = 1 (t=0) and 1/3 (t=1); γ = 0.5 -> eps: min(snr,γ)/snr = 0.5, 1 ; v: /(snr+1) = .25, .25 ; x0: .5, 1/3
    # γ = 5, floor 1 -> x0-weights clamp(snr, 1, 5) = 1, 1 ; eps: /snr = 1, 3 ; v: /(snr+1) = 1/2, 3/4
    s = two_step(pt)
    x0, noise, g = batch(B=2, H=4, W=4)
    t = torch.tensor([0, 1])
    pred = torch.randn(2, 1, 4, 4, generator=g)
    per_sample = ((pred - prediction_target(x0, noise, t, s)) ** 2).mean((1, 2, 3))
    cfg = LesionLossConfig(lesion_weight=0, ssim_weight=0, min_snr_gamma=gamma, min_snr_floor=floor)
    loss, parts = lesion_preserving_loss(pred, x0, s.add_noise(x0, noise, t), noise, t, None, s, cfg)
    expected = (weights[0] * per_sample[0] + weights[1] * per_sample[1]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts['mse'] == pytest.approx(per_sample.mean().item(), rel=1e-5)


# ---------------------------------------------------------------- SSIM
def test_ssim_identical_is_one():
    a = torch.rand(2, 3, 20, 20) * 2 - 1
    for kernel in ('gaussian', 'uniform'):
        torch.testing.assert_close(ssim(a, a, kernel=kernel), torch.ones(2))


@pytest.mark.parametrize('shape', [(24, 24), (13, 31)])
def test_ssim_matches_skimage(shape):
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, shape)
    b = np.clip(a + 0.3 * rng.standard_normal(shape), -1, 1)
    ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    # uniform 7x7 window with sample covariance = skimage's default
    ref = structural_similarity(a, b, data_range=2)
    assert ssim(ta, tb, kernel='uniform').item() == pytest.approx(ref, abs=1e-9)
    # Gaussian, Wang et al. 2004: skimage uses 11 taps for σ = 1.5 (truncate 3.5) -> our window=11
    ref = structural_similarity(a, b, data_range=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(ta, tb, window=11, kernel='gaussian', sigma=1.5).item() == pytest.approx(ref, abs=1e-9)
    # the loss default window 7: skimage's Gaussian has 7 taps for σ = 0.9 (int(3.5 σ + .5) = 3)
    ref = structural_similarity(a, b, data_range=2, gaussian_weights=True, sigma=0.9, use_sample_covariance=False, win_size=7)
    assert ssim(ta, tb, window=7, kernel='gaussian', sigma=0.9).item() == pytest.approx(ref, abs=1e-9)
    assert ref < 0.9                                       # the images do differ


def test_ssim_multichannel_is_channel_mean():
    rng = np.random.default_rng(2)
    a = rng.uniform(-1, 1, (3, 16, 16)); b = np.clip(a + 0.2 * rng.standard_normal(a.shape), -1, 1)
    ref = structural_similarity(a, b, data_range=2, channel_axis=0)
    assert ssim(torch.from_numpy(a)[None], torch.from_numpy(b)[None], kernel='uniform').item() == pytest.approx(ref, abs=1e-9)


def test_ssim_errors():
    a = torch.zeros(1, 1, 5, 5)
    with pytest.raises(ValueError, match='smaller than the 7 px window'):
        ssim(a, a)
    with pytest.raises(ValueError, match='same shape'):
        ssim(a, torch.zeros(1, 1, 5, 6))
    with pytest.raises(ValueError, match='kernel'):
        ssim(torch.zeros(1, 1, 9, 9), torch.zeros(1, 1, 9, 9), kernel='box')


# ---------------------------------------------------------------- bounding boxes and the SSIM term
def test_lesion_bboxes_by_hand():
    m = torch.zeros(3, 2, 16, 16); m[0, 1, 5, 6] = 1; m[1, 0, 0:2, 14:16] = 1
    assert lesion_bboxes(m, margin=2) == [(3, 8, 4, 9), (0, 4, 12, 16), None]
    assert lesion_bboxes(m, margin=0, min_size=7) == [(2, 9, 3, 10), (0, 7, 9, 16), None]
    m2 = torch.zeros(1, 1, 16, 16); m2[0, 0, 2, 3] = 1; m2[0, 0, 9, 12] = 1   # union: one box over both
    assert lesion_bboxes(m2, margin=1) == [(1, 11, 2, 14)]


def test_ssim_term_by_hand_and_samples_without_lesion_add_zero():
    s = sched('sample')
    x0, noise, g = batch(B=2, H=20, W=20)
    pred = (x0 + 0.2 * torch.randn(x0.shape, generator=g)).requires_grad_(True)
    mask = torch.zeros(2, 1, 20, 20); mask[0, 0, 8:11, 6:9] = 1        # sample 1: no lesion
    cfg = LesionLossConfig(lesion_weight=0, ssim_weight=0.7, min_snr_gamma=None, bbox_margin=3,
                           ssim_kernel='uniform', ssim_snr_weighting=False)
    loss, parts = lesion_preserving_loss(pred, x0, x0, noise, 0, mask, s, cfg)
    box = (5, 14, 3, 12)
    assert lesion_bboxes(mask, 3, 7) == [box, None]
    y0, y1, x0_, x1 = box
    ref = structural_similarity(pred[0, 0, y0:y1, x0_:x1].detach().double().numpy(),
                                x0[0, 0, y0:y1, x0_:x1].double().numpy(), data_range=2)
    ssim_term = (1 - ref) / 2                                            # sample 1 contributes 0; mean over B=2
    mse = F.mse_loss(pred, x0).item()
    assert parts['ssim'] == pytest.approx(ssim_term, rel=1e-5)
    assert loss.item() == pytest.approx(mse + 0.7 * ssim_term, rel=1e-5)
    assert parts['total'] == pytest.approx(parts['diffusion'] + 0.7 * parts['ssim'], rel=1e-6)
    loss.backward()
    mse_grad = 2 * (pred - x0).detach() / pred.numel()
    torch.testing.assert_close(pred.grad[1], mse_grad[1])                  # no lesion: MSE gradient only
    outside = torch.ones(20, 20, dtype=torch.bool); outside[y0:y1, x0_:x1] = False
    torch.testing.assert_close(pred.grad[0, 0][outside], mse_grad[0, 0][outside])   # SSIM acts inside the box only
    assert not torch.allclose(pred.grad[0, 0][~outside], mse_grad[0, 0][~outside])


def test_ssim_snr_weighting_multiplies_by_alpha_bar():
    s = two_step('sample')                                   # ᾱ = 0.5 at t = 0
    x0, noise, g = batch(B=1, H=12, W=12)
    pred = x0 + 0.3 * torch.randn(x0.shape, generator=g)
    mask = torch.zeros(1, 1, 12, 12); mask[0, 0, 5, 5] = 1
    base = dict(lesion_weight=0, ssim_weight=1.0, min_snr_gamma=None)
    p_off = lesion_preserving_loss(pred, x0, x0, noise, 0, mask, s, LesionLossConfig(**base, ssim_snr_weighting=False))[1]
    p_on = lesion_preserving_loss(pred, x0, x0, noise, 0, mask, s, LesionLossConfig(**base))[1]
    assert p_off['ssim'] > 0.01
    assert p_on['ssim'] == pytest.approx(0.5 * p_off['ssim'], rel=1e-5)


# ---------------------------------------------------------------- gradients, defaults, errors
@pytest.mark.parametrize('pt', PREDICTION_TYPES)
def test_backprop_finite_grads_all_prediction_types(pt):
    torch.manual_seed(0)
    s = sched(pt, beta_schedule='squaredcos_cap_v2')
    x0, noise, g = batch(B=4, C=1, H=32, W=32)
    t = torch.tensor([0, 10, 500, 999])                     # includes the nearly clean and the pure-noise ends
    x_t = s.add_noise(x0, noise, t)
    mask = torch.zeros(4, 2, 32, 32); mask[0, 0, 3:6, 3:5] = 1; mask[2, 1, 20:30, 10:25] = 1; mask[3, 0, 16, 16] = 1
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    loss, parts = lesion_preserving_loss(net(x_t), x0, x_t, noise, t, mask, s, LesionLossConfig())
    loss.backward()
    assert torch.isfinite(loss) and loss.ndim == 0
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in net.parameters())
    assert set(parts) >= {'mse', 'lesion_mse', 'ssim', 'total'} and all(isinstance(v, float) for v in parts.values())
    assert parts['ssim'] > 0 and parts['total'] == pytest.approx(loss.item())


def test_mask_none_with_defaults():
    s = sched('v_prediction')
    x0, noise, g = batch()
    pred = torch.randn(x0.shape, generator=g, requires_grad=True)
    t = torch.tensor([1, 2, 3])
    loss, parts = lesion_preserving_loss(pred, x0, s.add_noise(x0, noise, t), noise, t, None, s)
    loss.backward()
    assert parts['ssim'] == 0.0 and parts['lesion_mse'] == 0.0 and torch.isfinite(pred.grad).all()
    w = min_snr_weight(snr_of(t, s), 5.0, 'v_prediction')
    per_sample = ((pred.detach() - prediction_target(x0, noise, t, s)) ** 2).mean((1, 2, 3))
    assert loss.item() == pytest.approx((w * per_sample).mean().item(), rel=1e-5)


def test_bad_shapes_and_config_are_clear_errors():
    s = sched('epsilon')
    x0, noise, _ = batch(B=2)
    with pytest.raises(ValueError, match="'mask' has shape"):
        lesion_preserving_loss(x0, x0, x0, noise, 0, torch.zeros(2, 1, 8, 8), s)
    with pytest.raises(ValueError, match="'noise' has shape"):
        lesion_preserving_loss(x0, x0, x0, noise[:1], 0, None, s)
    with pytest.raises(ValueError, match='LesionLossConfig.lesion_weight'):
        LesionLossConfig(lesion_weight=-1)
    with pytest.raises(ValueError, match='LesionLossConfig.min_snr_gamma'):
        LesionLossConfig(min_snr_gamma=0)
    for floor, gamma in ((0, 5), (6, 5), (1, None), (True, 5)):
        with pytest.raises(ValueError, match='LesionLossConfig.min_snr_floor'):
            LesionLossConfig(min_snr_gamma=gamma, min_snr_floor=floor)
    with pytest.raises(ValueError, match='LesionLossConfig.ssim_window'):
        LesionLossConfig(ssim_window=6)
    with pytest.raises(ValueError, match='LesionLossConfig.ssim_kernel'):
        LesionLossConfig(ssim_kernel='box')
    assert LesionLossConfig(**LesionLossConfig().to_dict()) == LesionLossConfig()
    assert LesionLossConfig().min_snr_gamma == 5.0 and LesionLossConfig(min_snr_gamma=None).min_snr_gamma is None
