"""Integration tests for cxr_diffusion_nbs.conditioning: every condition combination, dropout, guidance, errors,
the frozen text encoder and the widget's pure function."""
import itertools, os
import pytest, torch
from cxr_diffusion_nbs.core import RARE_FINDINGS, CXRDataError
from cxr_diffusion_nbs.unet import unet_preset, make_noise_scheduler
from cxr_diffusion_nbs.conditioning import (ConditioningConfig, ConditioningError, ConditionalDenoiser, FrozenTextEncoder,
                                            batch_conditions, guided_prediction, condition_tensors, show_conditions,
                                            ellipse_mask)

torch.set_num_threads(1)
TINY = unet_preset('tiny')
B, S, F = 2, 32, len(RARE_FINDINGS)

def inputs(seed=0, L=6):
    g = torch.Generator().manual_seed(seed)
    return dict(x_t=torch.randn(B, 1, S, S, generator=g), t=torch.tensor([10, 700]),
                labels=torch.tensor([[1., 0, 0, 0, 0], [0, 1, 1, 0, 0]]),
                mask=(torch.rand(B, 1, S, S, generator=g) > .8).float(),
                text_emb=torch.randn(B, L, 384, generator=g),
                text_mask=torch.tensor([[1] * L, [1] * (L - 2) + [0, 0]]))

def kwargs_for(cc, d):
    kw = {}
    if cc.use_labels: kw['labels'] = d['labels']
    if cc.mask_mode: kw['mask'] = d['mask'] if cc.mask_mode == 'union' else d['mask'].repeat(1, F, 1, 1)
    if cc.use_text: kw['text_emb'], kw['text_mask'] = d['text_emb'], d['text_mask']
    return kw

def nonzero_grad(p): return p.grad is not None and p.grad.abs().sum().item() > 0

COMBOS = list(itertools.product([False, True], [None, 'union', 'per_finding'], [False, True]))

@pytest.mark.parametrize('use_labels, mask_mode, use_text', COMBOS)
def test_every_combination_forward_and_gradients(use_labels, mask_mode, use_text):
    torch.manual_seed(0)
    cc = ConditioningConfig(use_labels=use_labels, mask_mode=mask_mode, use_text=use_text)
    m = ConditionalDenoiser(TINY, cc)
    d = inputs()
    kw = kwargs_for(cc, d)
    y = m(d['x_t'], d['t'], **kw)
    assert y.shape == d['x_t'].shape and torch.isfinite(y).all()
    y.square().mean().backward()
    if use_labels:
        assert nonzero_grad(m.label_embed[0].weight)
        assert not nonzero_grad(m.null_label)            # no label dropped -> the null embedding is unused
    if mask_mode:
        w = m.unet.conv_in.weight.grad
        assert w[:, 1:1 + cc.mask_channels].abs().sum() > 0 and w[:, -1].abs().sum() > 0   # mask + indicator
    if use_text:
        assert nonzero_grad(m.text_in[1].weight) and not nonzero_grad(m.null_text)
    # all conditions absent: the null embeddings are what is used and trained
    m.zero_grad()
    y0 = m(d['x_t'], d['t'])
    assert y0.shape == d['x_t'].shape
    y0.square().mean().backward()
    if use_labels: assert nonzero_grad(m.null_label) and not nonzero_grad(m.label_embed[0].weight)
    if use_text: assert nonzero_grad(m.null_text)
    assert m.config_dict()['conditioning']['mask_mode'] == mask_mode

def test_null_is_not_empty():
    "Dropped mask != empty mask, dropped labels != 'no finding', dropped text != some prompt."
    torch.manual_seed(0)
    m = ConditionalDenoiser(TINY, ConditioningConfig(use_text=True)).eval()
    d = inputs()
    with torch.no_grad():
        base = m(d['x_t'], d['t'])
        assert not torch.allclose(base, m(d['x_t'], d['t'], mask=torch.zeros(B, 1, S, S)), atol=1e-6)
        assert not torch.allclose(base, m(d['x_t'], d['t'], labels=torch.zeros(B, F)), atol=1e-6)
        assert not torch.allclose(base, m(d['x_t'], d['t'], text_emb=d['text_emb'], text_mask=d['text_mask']), atol=1e-6)

def test_per_sample_drop_equals_absent_condition():
    torch.manual_seed(0)
    m = ConditionalDenoiser(TINY, ConditioningConfig(use_text=True)).eval()
    d = inputs()
    kw = dict(labels=d['labels'], mask=d['mask'], text_emb=d['text_emb'], text_mask=d['text_mask'])
    drop = dict(labels=torch.tensor([True, False]), mask=torch.tensor([False, True]), text=torch.tensor([True, True]))
    with torch.no_grad():
        y = m(d['x_t'], d['t'], **kw, drop=drop)
        y0 = m(d['x_t'][:1], d['t'][:1], mask=d['mask'][:1])                      # sample 0 keeps only its mask
        y1 = m(d['x_t'][1:], d['t'][1:], labels=d['labels'][1:])                  # sample 1 keeps only its labels
    torch.testing.assert_close(y[:1], y0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y[1:], y1, atol=1e-5, rtol=1e-4)

def test_text_padding_is_masked():
    "Extra padded tokens (mask 0) must not change the prediction."
    torch.manual_seed(0)
    m = ConditionalDenoiser(TINY, ConditioningConfig(use_labels=False, mask_mode=None, use_text=True)).eval()
    d = inputs()
    e, am = d['text_emb'][:, :4], torch.ones(B, 4, dtype=torch.long)
    e_pad = torch.cat([e, torch.randn(B, 3, 384)], 1); am_pad = torch.cat([am, torch.zeros(B, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(m(d['x_t'], d['t'], text_emb=e, text_mask=am),
                                   m(d['x_t'], d['t'], text_emb=e_pad, text_mask=am_pad), atol=1e-5, rtol=1e-4)

def test_drop_conditions_rates_independent_and_reproducible():
    cc = ConditioningConfig(use_text=True, p_drop_labels=0.1, p_drop_mask=0.3, p_drop_text=0.5)
    m = ConditionalDenoiser(TINY, cc)
    N = 20000
    conds = dict(labels=torch.zeros(N, F), mask=torch.zeros(N, 1, 2, 2), text_emb=torch.zeros(N, 1, 384),
                 text_mask=torch.ones(N, 1))
    out = m.drop_conditions(conds, generator=torch.Generator().manual_seed(1))
    dl, dm, dt = (out['drop'][k].float() for k in ('labels', 'mask', 'text'))
    assert abs(dl.mean() - .1) < .01 and abs(dm.mean() - .3) < .015 and abs(dt.mean() - .5) < .015
    assert abs((dl * dm).mean() - dl.mean() * dm.mean()) < .006     # independent
    assert abs((dm * dt).mean() - dm.mean() * dt.mean()) < .008
    assert out['labels'] is conds['labels'] and out['mask'] is conds['mask']   # tensors untouched (loss still needs the mask)
    again = m.drop_conditions(conds, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(out['drop'][k], again['drop'][k]) for k in out['drop'])
    # only present conditions get a drop entry; p=0 never drops, p=1 always does
    m0 = ConditionalDenoiser(TINY, ConditioningConfig(p_drop_labels=0., p_drop_mask=1.))
    o = m0.drop_conditions(dict(labels=torch.zeros(100, F), mask=torch.zeros(100, 1, 2, 2)))
    assert set(o['drop']) == {'labels', 'mask'} and not o['drop']['labels'].any() and o['drop']['mask'].all()
    assert 'drop' not in m0.drop_conditions({})

def test_guided_prediction():
    torch.manual_seed(0)
    m = ConditionalDenoiser(TINY, ConditioningConfig(use_text=True)).eval()
    d = inputs()
    conds = dict(labels=d['labels'], mask=d['mask'], text_emb=d['text_emb'], text_mask=d['text_mask'])
    with torch.no_grad():
        unc = m(d['x_t'], d['t'])
        only = dict(labels=m(d['x_t'], d['t'], labels=d['labels']), mask=m(d['x_t'], d['t'], mask=d['mask']),
                    text=m(d['x_t'], d['t'], text_emb=d['text_emb'], text_mask=d['text_mask']))
        torch.testing.assert_close(guided_prediction(m, d['x_t'], d['t'], conds, dict(labels=0, mask=0, text=0)), unc, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(guided_prediction(m, d['x_t'], d['t'], conds, {}), unc, atol=1e-5, rtol=1e-4)
        for c in only:
            sc = {k: float(k == c) for k in only}
            torch.testing.assert_close(guided_prediction(m, d['x_t'], d['t'], conds, sc), only[c], atol=1e-5, rtol=1e-4)
        g = guided_prediction(m, d['x_t'], 500, conds, dict(labels=3., text=-1.))
        t500 = torch.full((B,), 500)
        want = m(d['x_t'], t500) + 3 * (m(d['x_t'], t500, labels=d['labels']) - m(d['x_t'], t500)) \
               - (m(d['x_t'], t500, text_emb=d['text_emb'], text_mask=d['text_mask']) - m(d['x_t'], t500))
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConditioningError, match='scales'): guided_prediction(m, d['x_t'], d['t'], conds, dict(colour=1.))
    with pytest.raises(ConditioningError, match='no such condition'):
        guided_prediction(m, d['x_t'], d['t'], dict(labels=d['labels']), dict(mask=1.))

def test_errors_before_compute():
    m = ConditionalDenoiser(TINY, ConditioningConfig(mask_mode='per_finding'))
    d = inputs()
    cases = [(dict(mask=d['mask']), 'mask'), (dict(labels=torch.zeros(B, 3)), 'labels'),
             (dict(text_emb=d['text_emb']), 'text_emb'), (dict(mask=torch.zeros(B, F, 16, 16)), 'mask'),
             (dict(drop=dict(colour=torch.zeros(B, dtype=torch.bool))), 'drop')]
    for kw, field in cases:
        with pytest.raises(ConditioningError, match=f"field '{field}'"): m(d['x_t'], d['t'], **kw)
    with pytest.raises(ConditioningError, match="'x_t'"): m(torch.randn(B, 2, S, S), d['t'])
    with pytest.raises(ConditioningError, match="'t'"): m(d['x_t'], torch.tensor([1, 2, 3]))
    no_mask = ConditionalDenoiser(TINY, ConditioningConfig(mask_mode=None, use_labels=False))
    with pytest.raises(ConditioningError, match="mask_mode=None"): no_mask(d['x_t'], d['t'], mask=d['mask'])
    with pytest.raises(ConditioningError, match="use_labels=False"): no_mask(d['x_t'], d['t'], labels=d['labels'])
    assert issubclass(ConditioningError, CXRDataError) and issubclass(ConditioningError, ValueError)

def test_config_errors():
    with pytest.raises(ConditioningError, match="use 'effusion'"): ConditioningConfig(findings=('Pleural Effusion',))
    with pytest.raises(ConditioningError, match='unknown finding'): ConditioningConfig(findings=('pneumothoraxx',))
    with pytest.raises(ConditioningError, match='duplicates'): ConditioningConfig(findings=('mass', 'mass'))
    with pytest.raises(ConditioningError, match='mask_mode'): ConditioningConfig(mask_mode='both')
    with pytest.raises(ConditioningError, match='p_drop_text'): ConditioningConfig(p_drop_text=-0.1)
    with pytest.raises(ConditioningError, match='cross_attention_dim'):
        ConditionalDenoiser(unet_preset('tiny', cross_attention_dim=384), ConditioningConfig(use_text=False))
    assert ConditioningConfig(findings=['nodule']).findings == ('nodule',)
    assert [ConditioningConfig(mask_mode=mm).mask_channels for mm in (None, 'union', 'per_finding')] == [0, 1, F]

def test_config_dict_roundtrip_and_scheduler():
    m = ConditionalDenoiser(unet_preset('tiny', prediction_type='sample'), ConditioningConfig(use_text=True, mask_mode='per_finding'))
    d = m.config_dict()
    m2 = ConditionalDenoiser.from_config_dict(d)
    assert m2.config_dict() == d and m2.unet_cfg.cross_attention_dim == 384
    m2.load_state_dict(m.state_dict())          # same architecture
    assert make_noise_scheduler(m).config.prediction_type == 'sample'
    with pytest.raises(ConditioningError, match='model'): ConditionalDenoiser.from_config_dict({**d, 'model': 'X'})
    with torch.device('meta'): big = ConditionalDenoiser(unet_preset('gpu256'), ConditioningConfig(use_text=True))
    assert sum(p.numel() for p in big.parameters()) > 30e6

def test_batch_conditions_without_text():
    cc = ConditioningConfig(mask_mode='per_finding')
    batch = dict(image=torch.zeros(B, 1, S, S), labels=torch.ones(B, F), label_known=torch.ones(B, F, dtype=torch.bool),
                 mask=torch.zeros(B, F, S, S), text=['a', 'b'], image_id=['x', 'y'])
    kw = batch_conditions(batch, cc, device='cpu')
    assert set(kw) == {'labels', 'mask'} and kw['mask'].shape == (B, F, S, S)
    assert set(batch_conditions(batch, ConditioningConfig(use_labels=False, mask_mode=None))) == set()
    with pytest.raises(ConditioningError, match="'mask'"): batch_conditions(batch, ConditioningConfig(mask_mode='union'))
    with pytest.raises(ConditioningError, match="'labels'"): batch_conditions({**batch, 'labels': torch.ones(B, 3)}, cc)
    with pytest.raises(ConditioningError, match="'mask'"): batch_conditions({k: v for k, v in batch.items() if k != 'mask'}, cc)

def test_condition_tensors_pure_function():
    cc = ConditioningConfig(mask_mode='per_finding')
    ct = condition_tensors(['nodule', 'mass'], (0.5, 0.5, 0.25, 0.125), '', cc, size=64)
    assert ct['labels'].tolist() == [0., 1., 1., 0., 0.]
    assert ct['mask_input'].shape == (F + 1, 64, 64) and ct['mask_input'][-1].min() == 1
    area = ct['mask'][1].sum().item()
    assert abs(area - 3.14159 * 16 * 8) < 0.1 * area and ct['mask'][0].sum() == 0
    assert torch.equal(ct['mask'][1], ct['mask'][2]) and ct['text_emb'] is None
    u = condition_tensors([], None, '', ConditioningConfig(), size=32)
    assert u['mask'].shape == (1, 32, 32) and u['mask'].sum() == 0 and u['labels'].sum() == 0
    with pytest.raises(ConditioningError, match='findings'): condition_tensors(['fracture'], None, '', cc)
    with pytest.raises(ConditioningError, match="did you mean 'effusion'"): condition_tensors(['Pleural Effusion'], None, '', cc)
    assert ellipse_mask(10, .5, .5, 0, .2).sum() == 0
    fig = show_conditions(ct); assert len(fig.axes) == 2
    m = ConditionalDenoiser(unet_preset('tiny', image_size=64, attention_resolutions=(32,)), cc)
    with torch.no_grad(): assert m(torch.randn(1, 1, 64, 64), 10, **ct['kwargs']).shape == (1, 1, 64, 64)

def test_frozen_text_encoder_offline_and_cached():
    "Loads the bundled MiniLM with the hub switched off; frozen; token embeddings + mask; LRU cache."
    enc = FrozenTextEncoder(cache_size=2)
    emb, am = enc(['right-sided pneumothorax', 'no finding'])
    assert os.environ['HF_HUB_OFFLINE'] == '1' and os.environ['TRANSFORMERS_OFFLINE'] == '1'
    assert emb.shape[0] == 2 and emb.shape[2] == 384 and am.shape == emb.shape[:2]
    assert am[1].sum().item() == 4 and enc.tokens('no finding') == ['[CLS]', 'no', 'finding', '[SEP]']
    assert (emb[1, 4:] == 0).all() and emb.requires_grad is False
    assert all(not p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    e2, _ = enc(['no finding']); assert enc.hits == 1
    torch.testing.assert_close(e2[0], emb[1, :4])
    enc(['a', 'b', 'c']); assert len(enc._cache) == 2             # LRU bounded
    assert FrozenTextEncoder().model is enc.model                    # loaded once per process
    # different prompts give different embeddings, and the whole path works end to end
    cc = ConditioningConfig(use_text=True, mask_mode=None, use_labels=False)
    kw = batch_conditions(dict(text=['left pleural effusion', 'no finding']), cc, text_encoder=enc)
    assert not torch.allclose(kw['text_emb'][0, 1], kw['text_emb'][1, 1])
    ct = condition_tensors([], None, 'small nodule', cc, 32, text_encoder=enc)
    assert ct['tokens'][0] == '[CLS]' and ct['text_emb'].shape == (len(ct['tokens']), 384)
    m = ConditionalDenoiser(TINY, cc)
    with torch.no_grad(): assert m(torch.randn(2, 1, S, S), 5, **kw).shape == (2, 1, S, S)
