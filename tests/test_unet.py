"""Integration tests for cxr_diffusion_nbs.unet: configs, presets, diffusers models and the noise scheduler."""
import pytest, torch
from dataclasses import replace
from diffusers import UNet2DModel, UNet2DConditionModel, DDPMScheduler
from cxr_diffusion_nbs.unet import (UNetConfig, PRESETS, unet_preset, build_unet, make_noise_scheduler, count_params,
                                    unet_levels)


def test_presets_valid_and_sized():
    assert set(PRESETS) >= {'tiny', 'cpu64', 'gpu256', 'gpu512'}
    for name, cfg in PRESETS.items(): cfg.validate()
    assert count_params(PRESETS['tiny']) < 300_000
    assert 1.5e6 <= count_params(PRESETS['cpu64']) <= 4e6
    assert PRESETS['cpu64'].image_size == 64 and max(PRESETS['cpu64'].attention_resolutions) <= 16
    assert PRESETS['cpu64'].prediction_type in ('v_prediction', 'sample')
    assert 30e6 < count_params(PRESETS['gpu256']) < count_params(PRESETS['gpu512'])

@pytest.mark.parametrize('name', ['gpu256', 'gpu512'])
def test_gpu_presets_build_on_meta(name):
    cfg = PRESETS[name]
    with torch.device('meta'): m = build_unet(cfg)
    assert m.config.sample_size == cfg.image_size
    assert next(m.parameters()).device.type == 'meta'
    with torch.device('meta'): mt = build_unet(replace(cfg, cross_attention_dim=384), extra_in_channels=2)
    assert isinstance(mt, UNet2DConditionModel) and mt.config.in_channels == 3

def test_count_params_matches_real_build():
    cfg = PRESETS['tiny']
    assert count_params(cfg) == sum(p.numel() for p in build_unet(cfg).parameters())

@pytest.mark.parametrize('pt', ['epsilon', 'v_prediction', 'sample'])
def test_tiny_forward_shapes(pt):
    cfg = unet_preset('tiny', prediction_type=pt)
    m = build_unet(cfg)
    assert isinstance(m, UNet2DModel)
    x = torch.randn(3, 1, 32, 32)
    y = m(x, torch.tensor([0, 500, 999])).sample
    assert y.shape == x.shape

def test_attention_sits_where_asked():
    cfg = unet_preset('cpu64')
    m = build_unet(cfg)
    types = [type(b).__name__ for b in m.down_blocks]
    assert types == ['DownBlock2D', 'DownBlock2D', 'AttnDownBlock2D']
    assert [type(b).__name__ for b in m.up_blocks] == ['AttnUpBlock2D', 'UpBlock2D', 'UpBlock2D']
    assert m.mid_block.attentions[0] is not None
    no_attn = build_unet(unet_preset('cpu64', attention_resolutions=()))
    assert all(type(b).__name__ == 'DownBlock2D' for b in no_attn.down_blocks)
    assert no_attn.mid_block.attentions[0] is None
    lv = unet_levels(cfg)
    assert list(lv.size_px) == [64, 32, 16, 16] and list(lv.attention) == [False, False, True, True]

def test_extra_channels_class_embedding_and_text():
    cfg = unet_preset('tiny', cross_attention_dim=16)
    m = build_unet(cfg, extra_in_channels=3, class_embed_type='identity')
    assert isinstance(m, UNet2DConditionModel) and m.config.in_channels == 4
    y = m(torch.randn(2, 4, 32, 32), torch.tensor([1, 2]), encoder_hidden_states=torch.randn(2, 5, 16),
          class_labels=torch.randn(2, cfg.time_embed_dim)).sample
    assert y.shape == (2, 1, 32, 32)
    m2 = build_unet(PRESETS['tiny'], num_class_embeds=4)
    assert m2(torch.randn(2, 1, 32, 32), 3, class_labels=torch.tensor([0, 3])).sample.shape == (2, 1, 32, 32)

@pytest.mark.parametrize('kw, field', [
    (dict(image_size=60, block_out_channels=(32, 64, 128, 128)), 'image_size'),
    (dict(prediction_type='x0'), 'prediction_type'),
    (dict(block_out_channels=(32, 60, 128)), 'norm_num_groups'),
    (dict(norm_num_groups=12), 'norm_num_groups'),
    (dict(attention_resolutions=(12,)), 'attention_resolutions'),
    (dict(attention_resolutions=(), cross_attention_dim=384), 'cross_attention_dim'),
    (dict(attention_head_dim=48), 'attention_head_dim'),
    (dict(dropout=1.0), 'dropout'),
])
def test_config_errors_name_field(kw, field):
    with pytest.raises(ValueError, match=f"'{field}'"): UNetConfig(**kw)

def test_preset_overrides():
    assert unet_preset('cpu64', prediction_type='sample').prediction_type == 'sample'
    assert PRESETS['cpu64'].prediction_type == 'v_prediction'
    with pytest.raises(ValueError, match='unknown preset'): unet_preset('cpu128')
    with pytest.raises(ValueError, match='unknown field'): unet_preset('tiny', image_sise=64)
    # lists (from YAML) become tuples and round-trip
    cfg = UNetConfig.from_dict(unet_preset('tiny').to_dict())
    assert cfg == PRESETS['tiny'] and isinstance(cfg.block_out_channels, tuple)

def test_make_noise_scheduler():
    s = make_noise_scheduler(unet_preset('tiny', prediction_type='sample'))
    assert isinstance(s, DDPMScheduler)
    assert s.config.prediction_type == 'sample' and s.config.beta_schedule == 'squaredcos_cap_v2'
    assert s.config.num_train_timesteps == 1000
    s2 = make_noise_scheduler(200, beta_schedule='linear', prediction_type='epsilon')
    assert s2.config.num_train_timesteps == 200 and s2.config.prediction_type == 'epsilon'
    assert make_noise_scheduler().config.prediction_type == 'v_prediction'
    with pytest.raises(ValueError, match='contradicts'): make_noise_scheduler(PRESETS['tiny'], prediction_type='epsilon')
    with pytest.raises(ValueError, match='prediction_type'): make_noise_scheduler(prediction_type='x0')
    with pytest.raises(ValueError, match='beta_schedule'): make_noise_scheduler(beta_schedule='cosine2')

def test_tiny_trains_in_seconds():
    "The tiny preset must actually learn: overfitting one batch of structured images lowers the v-prediction loss."
    torch.manual_seed(0)
    cfg = PRESETS['tiny']
    m, s = build_unet(cfg), make_noise_scheduler(cfg)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing='ij')
    x0 = torch.stack([((xx - c)**2 + yy**2 < .3).float() * 2 - 1 for c in (-.4, 0., .4, .2)])[:, None]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (4,), generator=g)
    x_t, target = s.add_noise(x0, noise, t), s.get_velocity(x0, noise, t)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(m(x_t, t).sample, target)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
