"""The degradation model and the classical restoration baselines (`23_restoration`): reproducible per seed, the
statistics each step promises, bad specs refused by name, and baselines that do what a baseline must."""
import math, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_diffusion_nbs.core import ConfigError
from cxr_diffusion_nbs.restoration import (BASELINES, LEVELS, Degradation, DegradationError, all_conditions, as_degradation,
                                           batched_restorer, bicubic, block_mean, degrade, degrade_batch, film_psnr,
                                           level_spec, restoration_films, restoration_table, summary_line, to_intensity, tune)

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope='module')
def films():
    "Six real validation films at 128 px (shared subset when present, else the bundled sample), lesion films first."
    return restoration_films(n=6, size=128)


def test_reproducible_per_seed_and_different_across_seeds(films):
    spec = Degradation(dose=400, read_noise=0.005, jpeg=30)
    f = films['clean'][0]
    np.testing.assert_array_equal(degrade(f, spec, seed=3), degrade(f, spec, seed=3))
    assert not np.array_equal(degrade(f, spec, seed=3), degrade(f, spec, seed=4))
    np.testing.assert_array_equal(degrade(f, Degradation()), f)


def test_batch_adapter_is_degrade_per_film_with_its_seed(films):
    x = torch.from_numpy(films['clean'][:3]).float()[:, None] * 2 - 1
    spec = Degradation(dose=400, blur=1.0)
    out = degrade_batch(x, spec, seed=7)
    assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= -1 and out.max() <= 1
    for i in range(3):
        want = degrade((x[i, 0].double() + 1) / 2, spec, seed=[7, i]) * 2 - 1
        np.testing.assert_allclose(out[i, 0].numpy(), want, atol=1e-6)


@pytest.mark.parametrize('p', [0.3, 0.7])
def test_quantum_noise_is_poisson_in_the_intensity_domain(p):
    "Var(N / I0) = mean / I0 where the photons are counted; in the display domain exp(A p) / (A^2 I0) (delta method)."
    flat = np.full((160, 160), p)
    var = {}
    for I0 in (200, 800):
        d = degrade(flat, Degradation(dose=I0), seed=1)
        t = to_intensity(d)
        assert abs(t.mean() / math.exp(-3 * p) - 1) < 0.01
        assert abs(t.var() / (t.mean() / I0) - 1) < 0.06
        assert abs(d.var() / (math.exp(3 * p) / (9 * I0)) - 1) < 0.1
        var[I0] = d.var()
    assert 3.4 < var[200] / var[800] < 4.6                       # four times the dose, a quarter of the variance


def test_dense_regions_are_noisier_and_read_noise_lives_in_the_detector_signal():
    two = np.concatenate([np.full((80, 160), 0.2), np.full((80, 160), 0.8)])
    d = degrade(two, Degradation(dose=400), seed=0)
    assert d[80:].std() > 2 * d[:80].std()
    r = degrade(np.full((160, 160), 0.3), Degradation(read_noise=0.01), seed=0)
    assert abs(to_intensity(r).std() / 0.01 - 1) < 0.05


def test_downsample_keeps_the_size_and_the_block_means_and_loses_high_frequencies(films):
    f = films['clean'][0]
    for factor in (2, 4):
        d = degrade(f, Degradation(downsample=factor))
        assert d.shape == f.shape
        np.testing.assert_allclose(block_mean(d, factor), block_mean(f, factor), atol=1e-12)   # an area filter
        np.testing.assert_array_equal(d[::factor, ::factor].repeat(factor, 0).repeat(factor, 1), d)
    checker = (np.indices((64, 64)).sum(0) % 2).astype(float)                                  # the finest detail there is
    np.testing.assert_allclose(degrade(checker, Degradation(downsample=2)), 0.5)
    spec = np.abs(np.fft.fft2(f - f.mean())) ** 2
    spec_d = np.abs(np.fft.fft2(degrade(f, Degradation(downsample=4)) - f.mean())) ** 2
    k = np.abs(np.fft.fftfreq(f.shape[0]))
    band = (k[:, None] > 0.125) & (k[None, :] > 0.125)                                         # beyond the coarse Nyquist
    assert spec_d[band].sum() < 0.5 * spec[band].sum()


def test_jpeg_and_contrast(films):
    f = films['clean'][0]
    errs = [np.abs(degrade(f, Degradation(jpeg=q)) - f).mean() for q in (90, 40, 10)]
    assert errs[0] < errs[1] < errs[2]
    j = degrade(f, Degradation(jpeg=40))
    np.testing.assert_allclose(j * 255, np.round(j * 255), atol=1e-9)                         # stored in 8 bits
    c = degrade(f, Degradation(contrast=0.5))
    np.testing.assert_allclose(c - 0.5, 0.5 * (f - 0.5), atol=1e-12)                           # the range halved about mid-grey
    g = degrade(np.full((8, 8), 0.5), Degradation(gamma=1.5))
    assert (g < 0.5).all()                                                                     # gamma > 1 darkens mid-tones


@pytest.mark.parametrize('bad,field', [(dict(dose=0), 'dose'), (dict(dose=float('inf')), 'dose'), (dict(downsample=3), 'downsample'),
                                       (dict(jpeg=120), 'jpeg'), (dict(jpeg=12.5), 'jpeg'), (dict(blur=-1), 'blur'),
                                       (dict(contrast=0), 'contrast'), (dict(read_noise='a lot'), 'read_noise')])
def test_bad_specs_are_refused_naming_the_field(bad, field):
    with pytest.raises(DegradationError) as e: Degradation(**bad)
    assert e.value.field == field and f"'{field}'" in str(e.value)


def test_bad_names_and_films_are_refused():
    with pytest.raises(ConfigError, match="did you mean 'dose'"): as_degradation({'dosse': 400})
    with pytest.raises(DegradationError, match="'level'"): level_spec('jpeg', 'extreme')
    with pytest.raises(DegradationError, match="did you mean 'blur'"): all_conditions(['blurr'])
    with pytest.raises(DegradationError, match="'values'"): degrade(np.full((8, 8), 1.5), Degradation())
    with pytest.raises(DegradationError, match="'shape'"): degrade(np.zeros((1, 8, 8)), Degradation())
    with pytest.raises(DegradationError, match="not divisible by downsample=4"): degrade(np.zeros((10, 10)), Degradation(downsample=4))
    assert set(LEVELS) == {'noise', 'read_noise', 'blur', 'downsample', 'jpeg', 'contrast'}
    assert LEVELS['downsample'] == {'mild': {'downsample': 2}, 'severe': {'downsample': 4}}


def test_classical_denoisers_beat_the_degraded_input_on_moderate_noise(films):
    f, spec = films['clean'][0], level_spec('noise', 'moderate')
    d = degrade(f, spec, seed=0)
    for name in ('nl_means', 'tv', 'wavelet'):
        assert film_psnr(f, BASELINES[name].fn(d)) > film_psnr(f, d) + 1, name
    c = degrade(f, level_spec('downsample', 'mild'))
    assert film_psnr(f, bicubic(c, downsample=2)) > film_psnr(f, c) + 1


def test_tuning_picks_the_best_value_of_the_grid(films):
    spec = level_spec('noise', 'moderate')
    clean = films['clean'][:3]
    deg = np.stack([degrade(f, spec, seed=i) for i, f in enumerate(clean)])
    best, table = tune(BASELINES['tv'].fn, {'weight': (0.0005, 0.05, 3.0)}, clean, deg, spec)
    assert best == {'weight': 0.05} and len(table) == 3
    assert table.psnr.idxmax() == 1
    best2, table2 = tune(BASELINES['wavelet'].fn, BASELINES['wavelet'].grid, clean, deg, spec)
    assert len(table2) == 6 and best2['sigma_scale'] in (0.5, 1.0, 2.0) and best2['shrink'] in ('BayesShrink', 'VisuShrink')
    chosen = (table2.sigma_scale == best2['sigma_scale']) & (table2.shrink == best2['shrink'])
    assert table2.psnr[chosen].iloc[0] == table2.psnr.max()


def test_table_takes_any_restorer_and_summarises(films):
    calls = []
    @batched_restorer
    def oracle_blur(x, blur=0.0, **info):                                   # a model-form restorer that reads the spec
        calls.append((tuple(x.shape), blur)); return x
    t = restoration_table(films['clean'], films['masks'], conditions=[('noise', 'moderate'), ('downsample', 'mild')],
                          restorers={'degraded': BASELINES['degraded'], 'tv': BASELINES['tv'], 'bicubic': BASELINES['bicubic'], 'mine': oracle_blur})
    assert calls == [((3, 1, 128, 128), 0.0)] * 2                          # once per condition, on the 3 evaluation films
    assert set(t.method[t.kind == 'noise']) == {'degraded', 'tv', 'mine'}  # bicubic only where there is downsampling
    row = t.set_index(['kind', 'method'])
    assert row.loc[('noise', 'tv'), 'psnr_gain'] > 1 and row.loc[('downsample', 'bicubic'), 'psnr_gain'] > 1
    assert abs(row.loc[('noise', 'mine'), 'psnr_gain']) < 1e-9
    assert row.loc[('noise', 'tv'), 'n_lesion'] >= 1 and np.isfinite(row.loc[('noise', 'tv'), 'lesion_ssim'])
    line = summary_line(t)
    assert 'noise tv' in line and 'downsample bicubic' in line
