"""Integration tests for cxr_diffusion_nbs.conditioning: every condition combination, dropout, guidance, errors,
the frozen text encoder and the widget's pure function."""
import itertools, os
import pytest, torch
from cxr_diffusion_nbs.core import RARE_FINDINGS, CXRDataError, ConfigError
from cxr_diffusion_nbs.unet import unet_preset, make_noise_scheduler
from cxr_diffusion_nbs.conditioning import (ConditioningConfig, ConditioningError, ConditionalDenoiser, FrozenTextEncoder,
                                            batch_conditions, guided_prediction, condition_tensors, show_conditions,
                                            ellipse_mask, model_inputs, check_guidance, check_guidance_mode)

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

def test_guidance_is_checked_once_at_the_edge(monkeypatch):
    m = ConditionalDenoiser(TINY, ConditioningConfig()).eval()
    d = inputs()
    conds = dict(labels=d['labels'], mask=d['mask'])
    assert check_guidance(m, dict(labels=2, mask=0.5), conds) == dict(labels=2, mask=0.5)
    assert check_guidance(m.cond_cfg, None) == {}
    with pytest.raises(ConditioningError, match="guidance: field 'colour'"): check_guidance(m, dict(colour=1.))
    with pytest.raises(ConditioningError, match='no text conditioning'): check_guidance(m, dict(text=1.))
    with pytest.raises(ConditioningError, match='finite'): check_guidance(m, dict(labels=float('inf')))
    with pytest.raises(ConditioningError, match='finite'): check_guidance(m, dict(labels=True))
    with pytest.raises(ConditioningError, match="--guidance: field 'mask'.*no mask condition was passed"):
        check_guidance(m, dict(mask=1.), dict(labels=d['labels']), where='--guidance')
    assert check_guidance_mode('nested', 'x') == 'nested'
    with pytest.raises(ConditioningError, match="sample: field 'guidance_mode'"): check_guidance_mode('joint', 'sample')
    # guided_prediction trusts its inputs: the model is called without re-validation
    calls = []
    monkeypatch.setattr(m, 'check_inputs', lambda *a, **k: calls.append(1))
    with torch.no_grad(): guided_prediction(m, d['x_t'], d['t'], conds, dict(labels=2., mask=1.))
    assert calls == []
    with torch.no_grad(): m(d['x_t'], d['t'], **conds)
    assert calls == [1]

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
    with pytest.raises(ConfigError, match="name for it is 'effusion'"): ConditioningConfig(findings=('Pleural Effusion',))
    with pytest.raises(ConfigError, match=r"field 'findings\[0\]': unknown finding"): ConditioningConfig(findings=('pneumothoraxx',))
    with pytest.raises(ConfigError, match='duplicates'): ConditioningConfig(findings=('mass', 'mass'))
    with pytest.raises(ConfigError, match="field 'mask_mode'"): ConditioningConfig(mask_mode='both')
    with pytest.raises(ConfigError, match="field 'p_drop_text'"): ConditioningConfig(p_drop_text=-0.1)
    with pytest.raises(ConfigError, match="field 'findings'.*at least one"): ConditioningConfig(findings=())
    assert ConditioningConfig(findings=(), use_labels=False).findings == ()
    # from a config file: unknown keys with a hint, strings coerced, errors addressed to the file and section
    with pytest.raises(ConfigError, match=r"train.yaml: field 'conditioning.use_label'.*did you mean 'use_labels'"):
        ConditioningConfig.from_dict(dict(use_label=True), 'train.yaml', 'conditioning')
    with pytest.raises(ConfigError, match=r"train.yaml: field 'conditioning.p_drop_mask'"):
        ConditioningConfig.from_dict(dict(p_drop_mask=2), 'train.yaml', 'conditioning')
    c = ConditioningConfig.from_dict(dict(findings='nodule,mass', use_text='true', mask_mode='null', text_dim='384'))
    assert c == ConditioningConfig(findings=('nodule', 'mass'), use_text=True, mask_mode=None)
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


# ---------------------------------------------------------------- the one builder
def test_model_inputs_findings_forms():
    cc = ConditioningConfig()
    kw = model_inputs(cc, 2, findings='mass')
    assert set(kw) == {'labels'} and kw['labels'].tolist() == [[0., 0, 1, 0, 0]] * 2
    assert model_inputs(cc, 1, findings=['nodule', 'mass'])['labels'].tolist() == [[0., 1, 1, 0, 0]]      # both, every image
    assert model_inputs(cc, findings=[['nodule'], ['mass']])['labels'].tolist() == [[0., 1, 0, 0, 0], [0., 0, 1, 0, 0]]
    assert model_inputs(cc, findings=['nodule', None, []])['labels'].tolist() == [[0., 1, 0, 0, 0], [0.] * 5, [0.] * 5]
    assert model_inputs(cc, 3)['labels'].sum() == 0 and model_inputs(cc)['labels'].shape == (1, F)       # no finding; n = 1
    lab = torch.tensor([[1., 0, 0, 0, 1]])
    assert torch.equal(model_inputs(cc, labels=lab)['labels'], lab)
    assert model_inputs(cc, 3, labels=lab[0])['labels'].shape == (3, F)                                    # (F,) for all
    with pytest.raises(ConditioningError, match=r"where: field 'findings\[1\]'.*did you mean 'nodule'"):
        model_inputs(cc, findings=['mass', 'nodul', ''], where='where')
    with pytest.raises(ConditioningError, match="field 'labels'.*expected"): model_inputs(cc, labels=torch.ones(2, 3))
    with pytest.raises(ConditioningError, match="field 'labels'.*multi-hot"): model_inputs(cc, labels=torch.full((1, F), 2.))
    with pytest.raises(ConditioningError, match='not both'): model_inputs(cc, findings='mass', labels=lab)
    with pytest.raises(ConditioningError, match="field 'findings'.*no label conditioning"):
        model_inputs(ConditioningConfig(use_labels=False), findings='mass')
    with pytest.raises(ConditioningError, match="field 'findings'"): model_inputs(cc, findings=3)

def test_model_inputs_masks_to_the_model_mask_mode():
    g = torch.Generator().manual_seed(0)
    m2 = torch.rand(2, S, S, generator=g)
    union, per = ConditioningConfig(), ConditioningConfig(mask_mode='per_finding')
    want = (m2 > .5).float()[:, None]
    for given in (m2, m2[:, None], m2[:, None].repeat(1, F, 1, 1), m2.numpy()):
        kw = model_inputs(union, masks=given)
        assert torch.equal(kw['mask'], want) and kw['labels'].shape == (2, F)
    kw = model_inputs(union, 4, masks=m2[0])                                           # (H, W) for every image
    assert kw['mask'].shape == (4, 1, S, S) and torch.equal(kw['mask'][3, 0], want[0, 0])
    kw = model_inputs(per, findings=[['nodule', 'mass'], ['effusion']], masks=m2)      # union -> the findings' channels
    assert kw['mask'].shape == (2, F, S, S)
    assert torch.equal(kw['mask'][0, 1], want[0, 0]) and torch.equal(kw['mask'][0, 2], want[0, 0]) and kw['mask'][0, [0, 3, 4]].sum() == 0
    assert torch.equal(kw['mask'][1, 3], want[1, 0]) and kw['mask'][1, [0, 1, 2, 4]].sum() == 0
    pf = (torch.rand(2, F, S, S, generator=g) > .9).float()
    assert torch.equal(model_inputs(per, masks=pf)['mask'], pf)                        # per finding as is
    assert torch.equal(model_inputs(union, masks=pf)['mask'], pf.amax(1, keepdim=True))
    # a per-finding, label-free model: findings only place the union mask
    kw = model_inputs(ConditioningConfig(use_labels=False, mask_mode='per_finding'), findings='mass', masks=m2)
    assert set(kw) == {'mask'} and kw['mask'][:, 2].sum() > 0 and kw['mask'][:, [0, 1, 3, 4]].sum() == 0
    with pytest.raises(ConditioningError, match="image 1 has a union mask but no finding"):
        model_inputs(per, findings=['mass', ''], masks=m2)
    with pytest.raises(ConditioningError, match="field 'masks'.*channels"): model_inputs(union, masks=torch.zeros(2, 3, S, S))
    with pytest.raises(ConditioningError, match="field 'masks'.*shape"): model_inputs(union, masks=torch.zeros(S))
    with pytest.raises(ConditioningError, match="mask_mode=None"): model_inputs(ConditioningConfig(mask_mode=None), masks=m2)
    with pytest.raises(ConditioningError, match="field 'masks'.*disagree"): model_inputs(union, 3, masks=m2)
    with pytest.raises(ConditioningError, match="field 'masks'.*disagree"): model_inputs(union, findings=[['mass']] * 3, masks=m2)
    model = ConditionalDenoiser(TINY, union)                                          # a model also checks the size
    assert model_inputs(model, masks=m2)['mask'].shape == (2, 1, S, S)
    with pytest.raises(ConditioningError, match='the model draws 32x32'): model_inputs(model, masks=torch.zeros(16, 16))
    # what it builds is what the model takes
    with torch.no_grad(): assert model(torch.randn(2, 1, S, S), 5, **model_inputs(model, findings='nodule', masks=m2)).shape == (2, 1, S, S)

class FakeEncoder:
    "A stand-in text encoder: one 384-dim token per character (no model download in this test)."
    def __call__(self, texts):
        L = max(len(t) for t in texts) or 1
        emb, am = torch.zeros(len(texts), L, 384), torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts): emb[i, :len(t)] = float(len(t)); am[i, :len(t)] = 1
        return emb, am

def test_model_inputs_text_and_device():
    cc = ConditioningConfig(use_labels=False, mask_mode=None, use_text=True)
    kw = model_inputs(cc, 3, text='nodule', text_encoder=FakeEncoder())
    assert kw['text_emb'].shape == (3, 6, 384) and kw['text_mask'].sum().item() == 18
    kw = model_inputs(cc, text=['a', 'bcd'], text_encoder=FakeEncoder(), device='cpu')
    assert kw['text_emb'].shape[0] == 2 and kw['text_mask'].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert model_inputs(cc, 2) == {}                                                  # absent: the model uses its null
    with pytest.raises(ConditioningError, match="field 'text'.*disagree"): model_inputs(cc, 3, text=['a', 'b'], text_encoder=FakeEncoder())
    with pytest.raises(ConditioningError, match="field 'text'.*str"): model_inputs(cc, text=['a', 3], text_encoder=FakeEncoder())
    with pytest.raises(ConditioningError, match="use_text=False"): model_inputs(ConditioningConfig(), text='a')
    with pytest.raises(ConditioningError, match="field 'n'"): model_inputs(cc, 0)

def test_validate_false_skips_checks_only():
    torch.manual_seed(0)
    m = ConditionalDenoiser(TINY, ConditioningConfig(use_text=True)).eval()
    d = inputs()
    kw = dict(labels=d['labels'], mask=d['mask'], text_emb=d['text_emb'], text_mask=d['text_mask'])
    with torch.no_grad(): assert torch.equal(m(d['x_t'], d['t'], **kw), m(d['x_t'], d['t'], **kw, validate=False))

@pytest.mark.parametrize('mask_mode, use_text', [('union', False), ('per_finding', False), ('union', True)])
def test_mask_every_level_starts_as_the_plain_model_and_then_uses_the_mask(mask_mode, use_text):
    "Zero-initialised injectors: the same weights give the same prediction; trained injectors move it with the mask."
    import copy
    torch.manual_seed(0)
    plain = ConditionalDenoiser(TINY, ConditioningConfig(mask_mode=mask_mode, use_text=use_text)).eval()
    lv = ConditionalDenoiser(TINY, ConditioningConfig(mask_mode=mask_mode, use_text=use_text, mask_every_level=True)).eval()
    keys = lv.load_state_dict(plain.state_dict(), strict=False)
    assert not keys.unexpected_keys and all(k.startswith('mask_levels.') for k in keys.missing_keys)
    assert len(lv.mask_levels) == len(TINY.block_out_channels)
    d = inputs(); kw = kwargs_for(lv.cond_cfg, d)
    with torch.no_grad():
        torch.testing.assert_close(lv(d['x_t'], d['t'], **kw), plain(d['x_t'], d['t'], **kw))
        for p in lv.mask_levels.parameters(): torch.nn.init.normal_(p, std=0.1)
        y = lv(d['x_t'], d['t'], **kw)
        assert (y - plain(d['x_t'], d['t'], **kw)).abs().max() > 1e-3
        other = dict(kw, mask=torch.roll(kw['mask'], 7, -1))              # another mask: another prediction
        assert (lv(d['x_t'], d['t'], **other) - y).abs().max() > 1e-4
        # dropping the mask is the same as giving none, as for the input channels
        drop = dict(mask=torch.tensor([True, True]))
        torch.testing.assert_close(lv(d['x_t'], d['t'], **dict(kw, drop=drop)), lv(d['x_t'], d['t'], **{k: v for k, v in kw.items() if k != 'mask'}))
        c = copy.deepcopy(lv)                                              # the hooks follow the copy (EMA, accelerate)
        for p in c.mask_levels.parameters(): p.zero_()
        torch.testing.assert_close(c(d['x_t'], d['t'], **kw), plain(d['x_t'], d['t'], **kw))
        torch.testing.assert_close(lv(d['x_t'], d['t'], **kw), y)
    lv.train(); lv.zero_grad()
    lv(d['x_t'], d['t'], **kw).square().mean().backward()
    assert nonzero_grad(lv.mask_levels[0][-1].weight) and nonzero_grad(lv.mask_levels[-1][-1].weight)
    m2 = ConditionalDenoiser.from_config_dict(lv.config_dict())
    m2.load_state_dict(lv.state_dict())                                   # strict: the injectors are part of the model
    with pytest.raises(ConfigError, match="'mask_every_level'.*no mask"): ConditioningConfig(mask_mode=None, mask_every_level=True)
    with pytest.raises(ConfigError, match="'mask_every_level'"): ConditioningConfig(mask_every_level='yes')
