"""Conditioning fidelity: the measures on known inputs, and `measure` end to end on the bundled sample."""
import numpy as np, pandas as pd, pytest, torch
from cxr_diffusion_nbs.core import project_root, sample_data_root
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.condition_fidelity import (Judges, FidelityError, load_judges, donor_requests, plan_requests, reference,
                                                  lesion_contrast, measure, guidance_curve, load_fidelity, RESULT_TABLES)
from cxr_diffusion_nbs.sampling import load_generator

def test_lesion_contrast_sign_and_empty():
    img = torch.zeros(3, 1, 20, 20); m = torch.zeros(3, 1, 20, 20); m[:, :, 8:12, 8:12] = 1
    img[0] += m[0] * .4; img[1] -= m[1] * .3
    c = lesion_contrast(img, m)
    assert c[0] == pytest.approx(.4) and c[1] == pytest.approx(-.3) and c[2] == pytest.approx(0)
    assert np.isnan(lesion_contrast(img, torch.zeros_like(m))).all()

def test_plan_requests_tops_up_per_finding():
    lab = np.array([[1, 0], [0, 1], [0, 0]])
    d = plan_requests(lab, [0, 1], repeats=2, n_per_finding=5)
    assert (lab[d, 0] == 1).sum() == 5 and (lab[d, 1] == 1).sum() == 5 and list(d[:6]) == [0, 1, 2, 0, 1, 2]
    with pytest.raises(FidelityError): plan_requests(lab, [0], repeats=0)

def test_judges_must_share_a_size():
    j = load_judges(64)
    with pytest.raises(FidelityError, match='same size'):
        Judges(j.classifier, j.classifier_cfg, j.segmenter, type(j.segmenter_cfg)(image_size=128, levels=5))

def test_reference_is_the_generator_resolution(monkeypatch):
    monkeypatch.setenv('CXR_NO_SHARED', '1')
    req = donor_requests(load_shared_subset(sample_data_root()), 'val', ('nodule', 'mass'), 32, 64)
    assert req.masks.shape[1:] == (2, 32, 32) and req.films.shape[1:] == (1, 64, 64)
    r = reference(req, 32, 64)
    assert r.shape == req.films.shape and not torch.equal(r, req.films)
    assert reference(req, 64, 64) is req.films
    few = req.take([2, 0])
    assert few.image_ids == [req.image_ids[2], req.image_ids[0]] and few.findings == req.findings
    assert torch.equal(few.masks, req.masks[[2, 0]]) and torch.equal(few.films, req.films[[2, 0]])
    assert (few.labels == req.labels[[2, 0]]).all() and (few.complete == req.complete[[2, 0]]).all()

def test_measure_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setenv('CXR_NO_SHARED', '1')
    real = load_shared_subset(sample_data_root())
    gen = load_generator(project_root()/'data'/'models'/'cpu64_demo')
    res = measure(gen, real, 'val', load_judges(64), sampler='ddim', steps=3, batch=32, guidance={})   # unguided: one pass a step
    c = res.consistency
    assert list(c.finding) == list(gen.findings) and c.too_few.all()     # 30 validation images: nothing to conclude
    assert (c.synthetic_images == len(res.donors)).all() and np.isfinite(res.fidelity['fid'])
    assert 'all lesion images' in set(res.adherence.group)
    s = res.summary()
    assert set(s) >= {'consistency_min', 'adherence', 'fid', 'too_few'} and s['too_few']
    with pytest.raises(Exception, match='stepz'): measure(gen, real, 'val', load_judges(64), stepz=3)
    back = load_fidelity(res.save(tmp_path/'res.json', data=real.name, command='test'))   # stored and read back: the same result
    for t in RESULT_TABLES: pd.testing.assert_frame_equal(getattr(back, t), getattr(res, t), check_dtype=False, check_exact=True)
    assert back.fidelity == res.fidelity and back.about == dict(data=real.name, command='test') and back.synthetic is None
    assert (back.donors == res.donors).all() and back.options == res.options
    assert str(back.summary()) == str(s)                                              # NaN included
    (tmp_path/'other.json').write_text('{"about": {}}')
    with pytest.raises(FidelityError, match="'donors'"): load_fidelity(tmp_path/'other.json')
    with pytest.raises(FidelityError, match="'file'"): load_fidelity(tmp_path/'missing.json')
