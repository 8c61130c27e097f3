"""Tests of the side-by-side study of every generator (cxr_diffusion_nbs.comparison): the rows of `compare_generators`
(films drawn at their own size and judged at the judges', generators whose findings come in another order asked by
name, realness and downstream AUROC per row) and `downstream_auroc`, one classifier per training set and seed."""
import numpy as np
import pytest
import torch

from cxr_diffusion_nbs.comparison import ComparisonError, compare_generators, downstream_auroc, real_films
from cxr_diffusion_nbs.core import sample_data_root
from cxr_diffusion_nbs.gan import ConditionalGenerator, GANGenerator, judge_size
from cxr_diffusion_nbs.rarity import RarityConfig
from cxr_diffusion_nbs.realness import realness


class _Reordered:
    "A generator with a GAN's findings in reverse order, drawing at twice its size; it records the labels it is asked for."
    kind = 'test'
    def __init__(self, gen): self.gen, self.findings, self.image_size, self.asked = gen, tuple(reversed(gen.findings)), 2 * gen.image_size, []
    def generate(self, labels, seed, **options):
        self.asked.append(np.asarray(labels))
        x = self.gen.generate(labels=torch.as_tensor(labels).flip(1), seed=seed, **options)
        return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')


def test_compare_generators_measures_downstream_auroc_and_aligns_sizes_and_findings():
    torch.manual_seed(0)
    gen = GANGenerator(ConditionalGenerator(image_size=32, z_dim=16, channels=4, embed_dim=8))   # untrained, 32 px
    other = _Reordered(gen)                                   # 64 px, findings reversed
    cfg = RarityConfig(width=4, epochs=1, batch_size=8)
    keep = {}
    df = compare_generators({'tiny': gen, 'reordered': other}, n=8, root=sample_data_root(), max_pairs=10,
                            downstream_seeds=(0, 1), downstream_cfg=cfg, min_test_positives=8, keep_images=keep,
                            realness_kw=dict(steps=5))
    assert keep['tiny'].shape == (8, 1, 32, 32) and keep['reordered'].shape == (8, 1, 64, 64)     # as drawn
    assert set(df.attrs['seconds']) == set(df.index) and set(df.attrs['seconds']['tiny']) == {'draw', 'metrics', 'downstream', 'realness'}
    # realness per row (realness.realness against the validation films; the real row: real against real, the control)
    auc = df[['detector_auroc', 'detector_auroc_low', 'detector_auroc_high']]
    assert auc.notna().all().all() and auc.apply(lambda c: c.between(0, 1)).all().all()
    assert (df['detector_auroc_low'] <= df['detector_auroc_high']).all()
    assert (df[['sharpness_ratio', 'spectrum_distance']] >= 0).all().all() and df[['sharpness_ratio', 'spectrum_distance']].notna().all().all()
    assert list(df.index) == ['real training films', 'tiny', 'reordered']
    assert df['drawn_px'].tolist() == [64, 32, 64] and df.attrs['judge_px'] == 64
    test = real_films(gen.findings, 64, 'test', sample_data_root())
    kept = [f for f, p in zip(gen.findings, np.nansum(test['labels'] == 1, 0)) if p >= 8]
    assert kept and len(kept) < len(gen.findings)            # the bundled sample's test split has fewer than 8 of some findings
    cols = [f'downstream_auroc_{f}' for f in kept]
    assert set(c for c in df.columns if c.startswith('downstream_auroc_') and c != 'downstream_auroc_sd') == set(cols)
    assert df[cols + ['downstream_auroc', 'downstream_auroc_sd']].notna().all().all() and (df['downstream_seeds'] == 2).all()
    assert np.allclose(df['downstream_auroc'], df[cols].mean(axis=1))
    val = real_films(gen.findings, 64, 'val', sample_data_root())
    again = realness(val['images'], judge_size(keep['tiny'], 64), size=64, seed=0, steps=5)
    assert np.allclose(df.loc['tiny', ['detector_auroc', 'sharpness_ratio', 'spectrum_distance']].astype(float),
                       [again['detector_auroc'], again['sharpness_ratio'], again['spectrum_distance']])
    asked = np.concatenate(other.asked)
    assert np.array_equal(asked, np.nan_to_num(val['labels'])[np.arange(8) % len(val['labels'])][:, ::-1])   # matched by name
    other.findings = other.findings[1:] + ('hernia',)
    with pytest.raises(ComparisonError, match="'findings'"): compare_generators({'tiny': gen, 'other': other}, n=2, root=sample_data_root())


def test_downstream_auroc_trains_one_classifier_per_set_and_seed():
    tr, te = (real_films(size=64, split=s, root=sample_data_root()) for s in ('train', 'test'))
    cfg = RarityConfig(width=4, epochs=2, batch_size=16)
    sets = {'real': (tr['images'][:64], tr['labels'][:64]), 'noise': (torch.rand(64, 1, 32, 32) * 2 - 1, np.nan_to_num(tr['labels'][:64]))}
    res = downstream_auroc(sets, te, tr['findings'], seeds=(0, 1), cfg=cfg, min_test_positives=10)
    assert sorted(set(res['finding'])) == ['cardiomegaly', 'effusion'] and len(res) == 2 * 2 * 2
    assert res['auroc'].between(0, 1).all() and (res['test_pos'] >= 10).all()
    again = downstream_auroc({'real': sets['real']}, te, tr['findings'], seeds=(0,), cfg=cfg, min_test_positives=10)
    assert np.allclose(again['auroc'], res[(res['name'] == 'real') & (res['seed'] == 0)]['auroc'])      # a seed repeats
    with pytest.raises(ComparisonError, match='min_test_positives'): downstream_auroc(sets, te, tr['findings'], cfg=cfg, min_test_positives=999)
