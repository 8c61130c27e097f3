"""Cohort builder: planning, balance, provenance, DICOM marking, refusals before writing, kill-and-resume, mixing."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch, pydicom
from PIL import Image
from cxr_diffusion_nbs.core import project_root, sample_data_root, PatientLeakageError, ManifestError
from cxr_diffusion_nbs.manifest import load_shared_subset, Manifest, IMAGE_COLUMNS, mix_real_synthetic
from cxr_diffusion_nbs.image_io import read_image
from cxr_diffusion_nbs.cohort import (CohortConfig, CohortError, DonorPool, build_cohort, load_cohort, target_counts,
                                      plan_cohort, plan_conditions, jitter_mask, move_masks, donor_ref, cohort_key,
                                      scan_shared, image_seed, load_cohort_config, image_guidance)
from cxr_diffusion_nbs.checkpoints import generator_defaults
from cli_in_process import run_cli

BIN = Path(sys.executable).parent
DEMO = project_root()/'data'/'models'/'cpu64_demo'
FINDINGS = ('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly')

@pytest.fixture(scope='module')
def real(): return load_shared_subset(sample_data_root())

@pytest.fixture(scope='module')
def pool(real): return DonorPool(real, FINDINGS, 64, 'train')

def base(tmp, **kw):
    d = dict(checkpoint=str(DEMO), output_dir=str(tmp/'cohort'), data_root=str(sample_data_root()), steps=3, batch_size=3, seed=2)
    d.update(kw); return d

def test_balance_max_lifts_every_finding_to_the_top(pool):
    real_counts = pool.counts()
    add = target_counts(CohortConfig(balance='max'), pool)
    assert {real_counts[f] + add[f] for f in FINDINGS} == {max(real_counts.values())}
    capped = target_counts(CohortConfig(balance='max', max_per_finding=5), pool)
    assert max(capped.values()) == 5 and min(capped.values()) == 0

def test_plan_is_deterministic_and_uses_training_donors(pool, real):
    cfg = CohortConfig(counts={'nodule': 6, 'mass': 4}, seed=3)
    p1, p2 = plan_cohort(cfg, pool, cfg.counts), plan_cohort(cfg, pool, cfg.counts)
    pd.testing.assert_frame_equal(p1, p2)
    assert list(p1.target_finding) == ['nodule'] * 6 + ['mass'] * 4
    train_ids = set(real.images.loc[real.images.split == 'train', 'image_id'])
    assert set(p1.donor_image_id) <= train_ids
    assert len(set(p1.seed)) == 10 and p1.seed.iloc[0] == image_seed(3, 0)
    for _, r in p1.iterrows():
        lab, m = plan_conditions(r, pool, cfg)
        assert lab[FINDINGS.index(r.target_finding)] == 1
        assert m[FINDINGS.index(r.target_finding)].sum() > 0      # the target finding's lesion is in the mask

def test_single_finding_mode(pool):
    cfg = CohortConfig(counts={'nodule': 8}, co_occurring=False)
    for _, r in plan_cohort(cfg, pool, cfg.counts).iterrows():
        lab, m = plan_conditions(r, pool, cfg)
        assert lab.tolist() == [0, 1, 0, 0, 0] and m[[0, 2, 3, 4]].sum() == 0

def test_jitter_stays_in_region_and_image():
    m = torch.zeros(1, 64, 64); m[0, 20:28, 20:28] = 1
    region = torch.zeros(64, 64); region[10:40, 10:40] = 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        out, p = jitter_mask(m, region, rng, shift=.1, rotate=20, lesion_scale=(.7, 1.3), min_inside=.95)
        assert p['tries'] > 0
        assert float((out[0] * region).sum()) >= .95 * float(out[0].sum())
        torch.testing.assert_close(move_masks(m, p['angle'], p['scale'], p['tx'], p['ty']), out)
    # scale changes the area by about scale^2
    big = move_masks(m, scale=1.5)
    assert abs(float(big.sum()) / 64 - 2.25) < .4
    # an impossible region: no draw accepted, mask unchanged
    out, p = jitter_mask(m, torch.zeros(64, 64), rng, .1, 20, (.7, 1.3), .9)
    assert p['tries'] == 0 and torch.equal(out, m)

def test_cohort_provenance_dicom_and_schema(tmp_path, real):
    out = build_cohort(base(tmp_path, counts={'nodule': 2, 'effusion': 1}, dicom=True), progress=False)
    m = load_cohort(out)
    assert list(m.images.columns[:len(IMAGE_COLUMNS)]) == list(IMAGE_COLUMNS)
    im = m.images
    assert len(im) == 3 and (im.synthetic == 1).all() and (im.source == 'synthetic').all()
    for col in ('model_sha256', 'sampler', 'steps', 'guidance', 'seed', 'donor_ref', 'donor_image_id', 'mask_jitter', 'config'):
        assert im[col].notna().all(), col
    assert im.model_sha256.iloc[0] == __import__('hashlib').sha256((DEMO/'ema.safetensors').read_bytes()).hexdigest()
    assert set(im.patient_id).isdisjoint(set(real.images.patient_id))
    for _, r in im.iterrows():
        d = pydicom.dcmread(out/r.dicom_path)
        assert d.ConversionType == 'SYN' and 'SYNTHETIC' in d.SeriesDescription and list(d.ImageType)[:2] == ['DERIVED', 'SECONDARY']
        assert d.PatientID == r.image_id and str(d.SOPClassUID) == '1.2.840.10008.5.1.4.1.1.7.2'   # MF Grayscale Byte SC
        donor = real.images.set_index('image_id').loc[r.donor_image_id]
        assert donor.patient_id not in str(d)            # nothing of the donor patient in the header
        np.testing.assert_allclose(read_image(out/r.dicom_path), read_image(r.path), atol=1e-6)
    uids = {pydicom.dcmread(out/p).SOPInstanceUID for p in im.dicom_path}
    assert len(uids) == 3
    rec = generator_defaults(DEMO)['guidance']                  # no guidance asked: the model's recommended scales
    assert 'mask' in rec
    for _, r in im.iterrows():                                  # provenance claims only the scales that acted on the image
        want = rec if r.mask_used else {k: v for k, v in rec.items() if k != 'mask'}
        assert json.loads(r.guidance) == want
        png = json.loads(__import__('PIL.Image', fromlist=['Image']).open(out/r.path).text['Provenance'])
        assert png['guidance'] == want and png['mask_used'] == bool(r.mask_used)
    ann = m.annotations
    assert set(ann.kind) == {'mask'} and all(Path(p).exists() for p in ann.mask_path)
    assert set(ann.loc[ann.image_id == im.image_id.iloc[0], 'finding']) >= {'nodule'}

# -- issue 12: no donor identifier and no machine path in what a cohort shares; valid DICOM -------------------------

def _shared_blobs(out):
    "Every file of a cohort outside private/, as bytes (PNG text chunks decoded too, as they may be compressed)."
    from PIL import Image
    for p in sorted(out.rglob('*')):
        if p.is_file() and p.relative_to(out).parts[0] != 'private':
            b = p.read_bytes()
            if p.suffix == '.png': b += json.dumps(Image.open(p).text).encode()
            yield p.relative_to(out).as_posix(), b

@pytest.fixture(scope='module')
def shared_cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('shared')
    return build_cohort(base(tmp, counts={'nodule': 2, 'mass': 1, 'effusion': 1}, dicom=True), progress=False)

def test_shared_outputs_carry_no_donor_id_and_no_machine_path(shared_cohort, real):
    out = shared_cohort
    needles = {*real.images.image_id, *real.images.patient_id, *(Path(p).stem for p in real.images.path),
               str(out.parent), str(project_root()), str(sample_data_root()), str(Path.home())}
    files = dict(_shared_blobs(out))
    assert {'plan.csv', 'images.csv', 'cohort.json', 'manifest.json', 'records.jsonl', 'README.md'} <= set(files)
    assert any(f.startswith('dicom/') for f in files) and any(f.startswith('images/') for f in files)
    leaks = [(f, n) for f, b in files.items() for n in needles if n.encode() in b]
    assert leaks == [], leaks[:5]
    assert scan_shared(out, needles) == []
    # the link lives in private/: owner-only, keyed, and load_cohort puts the real donor back
    key = cohort_key(out)
    assert oct((out/'private').stat().st_mode & 0o777) == '0o700' and oct((out/'private'/'donor_key').stat().st_mode & 0o777) == '0o600'
    m = load_cohort(out)
    train = set(real.subset(split='train').images.image_id)
    assert set(m.images.donor_image_id) <= train
    assert all(donor_ref(key, d) == r for d, r in zip(m.images.donor_image_id, m.images.donor_ref))
    png = json.loads(__import__('PIL.Image', fromlist=['Image']).open(out/m.images.path[0]).text['Provenance'])
    assert png['donor_ref'] == m.images.donor_ref[0] and 'donor_image_id' not in png
    assert 'never share' in (out/'private'/'README.md').read_text() and 'private/' in (out/'README.md').read_text()

def test_scan_finds_a_planted_identifier_and_a_cohort_without_private_reads_unlinked(shared_cohort, real, tmp_path):
    out = tmp_path/'copy'; shutil.copytree(shared_cohort, out)
    donor = load_cohort(out).images.donor_image_id[0]
    from cxr_diffusion_nbs.image_io import write_png
    write_png(out/'images'/'extra.png', np.zeros((4, 4), np.uint8), {'Comment': f'from {donor}'})
    assert scan_shared(out, [donor]) == [('images/extra.png', donor)]
    (out/'images'/'extra.png').unlink()
    shutil.rmtree(out/'private')                       # as a recipient gets it
    m = load_cohort(out)
    assert 'donor_image_id' not in m.images and m.images.donor_ref.str.startswith('donor_').all()
    with pytest.raises(CohortError, match="donor_key.*missing"):     # cannot be extended without its key
        build_cohort(dict(json.loads((shared_cohort/'cohort.json').read_text())['request'], checkpoint=str(DEMO),
                          output_dir=str(out), data_root=str(sample_data_root())), progress=False)

# The module rules dciodvfy checks for a Multi-frame Grayscale Byte Secondary Capture, as pydicom sees them
# (PS3.3 A.8.3; Type 1: present with a value, Type 2: present, may be empty, absent: must not be there).
SC_RULES = {1: ('SOPClassUID', 'SOPInstanceUID', 'StudyInstanceUID', 'SeriesInstanceUID', 'Modality', 'ConversionType',
                'SamplesPerPixel', 'PhotometricInterpretation', 'Rows', 'Columns', 'BitsAllocated', 'BitsStored',
                'HighBit', 'PixelRepresentation', 'NumberOfFrames', 'PresentationLUTShape', 'RescaleIntercept',
                'RescaleSlope', 'RescaleType', 'ImageType', 'PixelData'),
            2: ('PatientName', 'PatientID', 'PatientBirthDate', 'PatientSex', 'StudyDate', 'StudyTime',
                'ReferringPhysicianName', 'StudyID', 'AccessionNumber', 'SeriesNumber', 'InstanceNumber',
                'PatientOrientation', 'ContentDate', 'ContentTime'),
            'absent': ('Laterality', 'FrameIncrementPointer', 'FrameTime')}

def test_synthetic_dicom_follows_the_module_rules(shared_cohort):
    for p in sorted((shared_cohort/'dicom').glob('*.dcm')):
        d = pydicom.dcmread(p)
        assert d.SOPClassUID.name == 'Multi-frame Grayscale Byte Secondary Capture Image Storage'
        assert d.file_meta.MediaStorageSOPClassUID == d.SOPClassUID
        for k in SC_RULES[1]: assert k in d and d[k].value not in (None, '', b''), (p.name, k)
        for k in SC_RULES[2]: assert k in d, (p.name, k)
        for k in SC_RULES['absent']: assert k not in d, (p.name, k)
        assert (d.BitsAllocated, d.BitsStored, d.HighBit, d.PhotometricInterpretation) == (8, 8, 7, 'MONOCHROME2')
        assert (d.NumberOfFrames, d.PresentationLUTShape, d.RescaleType, d.ConversionType, d.Modality) == (1, 'IDENTITY', 'US', 'SYN', 'OT')
        assert list(d.PatientOrientation) == ['L', 'F'] and d.BodyPartExamined == 'CHEST'

@pytest.mark.skipif(shutil.which('dciodvfy') is None, reason='dicom3tools (Debian package) not installed')
def test_synthetic_dicom_passes_dciodvfy(shared_cohort):
    for p in sorted((shared_cohort/'dicom').glob('*.dcm')):
        r = subprocess.run(['dciodvfy', str(p)], capture_output=True, text=True)
        report = (r.stdout + r.stderr).strip().splitlines()
        assert report[0] == 'MultiframeGrayscaleByteSCImage', report
        assert not [l for l in report if l.startswith(('Error', 'Warning'))], report

def test_output_folder_checked_before_the_model_loads(tmp_path, monkeypatch):
    import cxr_diffusion_nbs.cohort as C
    monkeypatch.setattr(C, 'load_generator', lambda *a, **k: pytest.fail('the model was loaded before the folder was checked'))
    f = tmp_path/'a_file'; f.write_text('x')
    with pytest.raises(CohortError, match="output_dir.*is a file"): build_cohort(base(tmp_path, output_dir=str(f), counts={'nodule': 1}))
    with pytest.raises(CohortError, match="output_dir.*cannot be created: a_file is a file"):
        build_cohort(base(tmp_path, output_dir=str(f/'cohort'), counts={'nodule': 1}))
    other = tmp_path/'other'; other.mkdir(); (other/'notes.txt').write_text('x')
    with pytest.raises(CohortError, match='not empty and not a cohort folder'): build_cohort(base(tmp_path, output_dir=str(other), counts={'nodule': 1}))

def test_image_guidance_drops_the_mask_scale_of_a_maskless_image():
    g = {'labels': 4.0, 'mask': 2.0}
    assert image_guidance(g, True) == g and image_guidance(g, False) == {'labels': 4.0} and image_guidance({}, False) == {}

@pytest.mark.parametrize('kw,field', [
    (dict(counts={'hernia': 2}), 'not trained on'), (dict(counts={'nodule': -1}), 'counts.nodule'),
    (dict(counts={'nodule': 1}, guidance={'text': 2}), 'no text conditioning'),
    (dict(counts={'nodule': 1}, severity=2, guidance={'labels': 1}), "'severity'"),
    (dict(counts={'nodule': 1}, sampler='euler'), "'sampler'"), (dict(counts={'nodule': 1}, split='test'), "'split'"),
    (dict(counts={'nodule': 1}, balance='max'), 'not both'), (dict(), 'nothing to generate'),
    (dict(counts={'nodule': 1}, lesion_scale=(1.2, .8)), "'lesion_scale'"), (dict(counts={'nodule': 1}, colour=1), "'colour'")])
def test_refusals_write_nothing(tmp_path, kw, field):
    with pytest.raises(CohortError, match=field): build_cohort(base(tmp_path, **kw), progress=False)
    assert not (tmp_path/'cohort').exists()

def test_foreign_or_different_folder_refused(tmp_path, real):
    real.subset(split='val').to_csv(tmp_path/'cohort')
    before = sorted(p.name for p in (tmp_path/'cohort').iterdir())
    with pytest.raises(CohortError, match='manifest'): build_cohort(base(tmp_path, counts={'nodule': 1}), progress=False)
    assert sorted(p.name for p in (tmp_path/'cohort').iterdir()) == before
    (tmp_path/'other').mkdir(); (tmp_path/'other'/'notes.txt').write_text('x')
    with pytest.raises(CohortError, match='not empty'):
        build_cohort(base(tmp_path, counts={'nodule': 1}, output_dir=str(tmp_path/'other')), progress=False)
    build_cohort(base(tmp_path, counts={'nodule': 1}, output_dir=str(tmp_path/'c2')), progress=False)
    with pytest.raises(CohortError, match='different cohort'):
        build_cohort(base(tmp_path, counts={'nodule': 2}, output_dir=str(tmp_path/'c2')), progress=False)

def test_cli_killed_and_resumed_equals_uninterrupted(tmp_path):
    args = ['--checkpoint', str(DEMO), '--counts', 'nodule=4,mass=3,pneumothorax=2', '--steps', '4', '--batch-size', '2',
            '--seed', '9', '--set', f'data_root={sample_data_root()}', '--no-progress']
    full = subprocess.run([str(BIN/'cxr-cohort'), *args, '--output', str(tmp_path/'full')], capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path/'killed'
    p = subprocess.Popen([str(BIN/'cxr-cohort'), *args, '--output', str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 600:
        rec = killed/'records.jsonl'
        if rec.exists() and len(rec.read_text().splitlines()) >= 3: break
        time.sleep(.05)
    p.send_signal(signal.SIGKILL); p.wait()
    n_done = len((killed/'records.jsonl').read_text().splitlines())
    assert 3 <= n_done < 9 and not (killed/'images.csv').exists()
    (killed/'images'/'.syn_000004.png.k1lled_x.png').write_bytes(b'half a PNG')    # as a kill mid-write leaves it
    again = subprocess.run([str(BIN/'cxr-cohort'), *args, '--output', str(killed)], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = load_cohort(tmp_path/'full'), load_cohort(killed)
    assert list(a.images.image_id) == list(b.images.image_id) and len(b.images) == 9
    assert len((killed/'records.jsonl').read_text().splitlines()) == 9          # nothing duplicated
    for pa, pb in zip(a.images.path, b.images.path): np.testing.assert_array_equal(read_image(pa), read_image(pb))
    assert not list(killed.rglob('.*.tmp')) and not [q for q in killed.rglob('.*') if q.is_file()]

def test_cli_refusal_exit_code(tmp_path):
    r = run_cli('cxr-cohort', '--checkpoint', DEMO, '--counts', 'hernia=2', '--output', tmp_path/'x')   # the killed run above is the real process
    assert r.returncode == 2 and 'not trained on' in r.stderr and not (tmp_path/'x').exists()

def test_config_file_and_overrides(tmp_path):
    cfg, src = load_cohort_config(project_root()/'configs'/'cohort.yaml', ['counts.nodule=3', 'balance=null', 'guidance.mask=1.5'])
    assert cfg.counts == {'nodule': 3} and cfg.balance is None and cfg.guidance == {'mask': 1.5}
    assert (cfg.sampler, cfg.steps) == (None, None)           # the generator's own: the config serves a diffusion model and a GAN
    with pytest.raises(CohortError, match='only counts'): load_cohort_config(None, ['sampler.x=1'])

def test_mix_ratio_and_leakage(tmp_path, real):
    out = build_cohort(base(tmp_path, counts={'nodule': 3, 'mass': 3}), progress=False)
    syn = load_cohort(out)
    n_real = int((real.images.split == 'train').sum())
    mixed = mix_real_synthetic(real, syn, ratio=4 / n_real, seed=1)
    assert int(mixed.images.synthetic.sum()) == 4 and int((mixed.images.synthetic == 0).sum()) == n_real
    assert mixed.findings == list(FINDINGS) and (mixed.images.split == 'train').all()
    mixed.validate()
    with pytest.raises(ManifestError, match='needs'): mix_real_synthetic(real, syn, ratio=1.)
    with pytest.raises(ManifestError, match="'ratio'"): mix_real_synthetic(real, syn, ratio=-1)
    val_id = real.images.loc[real.images.split == 'val', 'image_id'].iloc[0]
    leaky = Manifest(syn.images.assign(donor_image_id=val_id), syn.annotations, syn.findings, syn.root, 'leaky')
    with pytest.raises(PatientLeakageError, match='donor_image_id'): mix_real_synthetic(real, leaky, ratio=.01)
    with pytest.raises(ManifestError, match="'synthetic'"): mix_real_synthetic(real, real.subset(findings=list(FINDINGS)), ratio=.1)

def _as_old_cohort(src, dst):
    "A copy of cohort `src` as versions before donor references wrote it: real donor ids in plan, images.csv and provenance."
    from PIL import Image
    from cxr_diffusion_nbs.image_io import write_png
    shutil.copytree(src, dst)
    link = pd.read_csv(dst/'private'/'donors.csv', dtype=str).set_index('donor_ref')['donor_image_id']
    shutil.rmtree(dst/'private'); (dst/'README.md').unlink()
    plan = pd.read_csv(dst/'plan.csv', keep_default_na=False)
    plan.insert(3, 'donor_index', 0); plan.insert(4, 'donor_image_id', plan.pop('donor_ref').map(link))
    plan.to_csv(dst/'plan.csv', index=False)
    for p in (dst/'images').glob('*.png'):
        im = Image.open(p); t = dict(im.text); prov = json.loads(t['Provenance'])
        prov['donor_image_id'] = link[prov.pop('donor_ref')]; t['Provenance'] = json.dumps(prov)
        write_png(p, np.asarray(im), t)
    for p in (dst/'dicom').glob('*.dcm'):
        d = pydicom.dcmread(p); prov = json.loads(d.ImageComments)
        prov['donor_image_id'] = link[prov.pop('donor_ref')]; d.ImageComments = json.dumps(prov); d.save_as(p)
    return plan

def test_privatise_an_older_cohort_in_place(shared_cohort, real, tmp_path):
    from cxr_diffusion_nbs.cohort import privatise_cohort
    from PIL import Image
    old = tmp_path/'old'; plan = _as_old_cohort(shared_cohort, old)
    ids = list(plan.donor_image_id)
    assert scan_shared(old, ids)                                     # the old layout leaks
    before = {p.name: np.asarray(Image.open(p)) for p in (old/'images').glob('*.png')}
    privatise_cohort(old, data_root=str(sample_data_root()))
    assert scan_shared(old, [*real.images.image_id, *real.images.patient_id, str(tmp_path)]) == []
    m = load_cohort(old)
    assert list(m.images.donor_image_id) == ids                      # the link is kept, privately
    for p in (old/'images').glob('*.png'): np.testing.assert_array_equal(np.asarray(Image.open(p)), before[p.name])
    with pytest.raises(CohortError, match='already names donors by donor_ref'): privatise_cohort(old)

def _zeros_instead_of_sampling(monkeypatch, **recommended):
    """build_cohort with the real generator loaded and its options checked, but images of zeros: seconds, not a minute of
    sampling. `recommended`: sampling defaults that replace what the model's generator.json recommends."""
    import cxr_diffusion_nbs.cohort as C
    load = C.load_generator
    def fake_load(*a, **kw):
        g = load(*a, **kw)
        g.defaults.update(recommended)
        def generate(labels=None, masks=None, seed=0, **options):
            g.check_options('test', **options)
            return torch.zeros(len(labels), 1, g.image_size, g.image_size)
        g.generate = generate
        return g
    monkeypatch.setattr(C, 'load_generator', fake_load)

def test_default_diffusion_cohort_keeps_its_identity(tmp_path, monkeypatch):
    "What a default cohort records (identity, request, PNG provenance, images.csv) is what it recorded before: earlier cohorts resume."
    gold = json.loads((Path(__file__).parent/'fixtures'/'cohort_default_identity.json').read_text())
    _zeros_instead_of_sampling(monkeypatch, sampler='dpmpp')    # the demo as it was: guidance recommended, not a sampler
    out = build_cohort(dict(checkpoint=str(DEMO), output_dir=str(tmp_path/'c'), data_root=str(sample_data_root()),
                            counts={'nodule': 1, 'effusion': 1}, dicom=True), progress=False)
    meta = json.loads((out/'cohort.json').read_text())
    png = Image.open(out/'images/syn_000000.png').text
    prov = json.loads(png['Provenance'])
    assert meta['identity'].pop('model_sha256') == prov.pop('model_sha256')        # the demo's weights: not frozen here
    assert meta['identity'] == gold['identity']
    assert {k: v for k, v in meta['request'].items() if k not in ('output_dir', 'data_root', 'checkpoint')} == gold['request']
    assert {k: v for k, v in prov.items() if k not in ('package', 'donor_ref')} == {k: v for k, v in gold['provenance'].items() if k != 'model_sha256'}
    assert png['Description'] == gold['description']
    im = pd.read_csv(out/'images.csv')
    assert {c: im[c].tolist() for c in gold['images_csv']} == gold['images_csv']

GAN = project_root()/'data'/'models'/'gan64'

def test_gan_cohort_builds_reads_back_and_claims_no_sampler(tmp_path):
    "The shipped GAN through build_cohort with default fields: labels-only conditions, a note and provenance that say GAN, no sampler or steps."
    out = build_cohort(dict(checkpoint=str(GAN), output_dir=str(tmp_path/'gan'), data_root=str(sample_data_root()),
                            counts={'nodule': 2, 'effusion': 1}, dicom=True, batch_size=2), progress=False)
    m = load_cohort(out)
    assert len(m.images) == 3 and len(m.annotations) == 0 and not (out/'masks').exists()      # a GAN takes no mask: none claimed
    meta = json.loads((out/'cohort.json').read_text())
    assert meta['generator_kind'] == 'gan' and meta['identity']['options'] == {'truncation': None}
    assert {meta['request'][k] for k in ('sampler', 'steps', 'eta')} == {None}
    png = Image.open(out/m.images.path[0]).text
    prov = json.loads(png['Provenance'])
    assert 'generated by a GAN' in png['Description'] and prov['kind'] == 'gan' and not prov['mask_used']
    assert not {'sampler', 'steps', 'eta', 'guidance', 'guidance_mode'} & set(prov)
    readme = (out/'README.md').read_text()
    assert 'drawn by a GAN' in readme and 'sampler' not in readme.replace('no sampler', '') and 'steps' not in readme
    d = pydicom.dcmread(out/m.images.dicom_path[0])
    assert 'GAN' in d.SeriesDescription and 'generated by a GAN' in d.DerivationDescription
    assert m.images[['sampler', 'steps', 'eta']].isna().all().all() and set(m.images.target_finding) == {'nodule', 'effusion'}
    assert build_cohort(dict(checkpoint=str(GAN), output_dir=str(out), data_root=str(sample_data_root()),   # the same cohort resumes
                             counts={'nodule': 2, 'effusion': 1}, dicom=True, eta=0.0), progress=False) == out

@pytest.mark.parametrize('kw, field', [(dict(steps=20), 'steps'), (dict(sampler='ddim'), 'sampler'), (dict(severity=2.0), 'severity'),
                                       (dict(guidance={'mask': 1.0}), 'guidance')])
def test_gan_cohort_refuses_diffusion_options(tmp_path, kw, field):
    with pytest.raises(CohortError, match=f"field '{field}'.*diffusion option"):
        build_cohort(dict(checkpoint=str(GAN), output_dir=str(tmp_path/'gan'), counts={'nodule': 1}, **kw), progress=False)
    assert not (tmp_path/'gan').exists()

def test_default_cohort_takes_the_models_recommended_sampler(tmp_path, monkeypatch):
    "A sampler the model's generator.json recommends is what a cohort with default fields uses and records; a set field wins."
    _zeros_instead_of_sampling(monkeypatch, sampler='ddim')
    kw = dict(checkpoint=str(DEMO), data_root=str(sample_data_root()), counts={'nodule': 1})
    out = build_cohort(dict(kw, output_dir=str(tmp_path/'c')), progress=False)
    meta = json.loads((out/'cohort.json').read_text())
    assert meta['identity']['sampler'] == meta['identity']['options']['sampler'] == 'ddim'
    assert meta['identity']['steps'] == 20                            # unrecommended fields: the cohort's own defaults
    assert set(pd.read_csv(out/'images.csv').sampler) == {'ddim'}
    out = build_cohort(dict(kw, output_dir=str(tmp_path/'d'), sampler='ddpm', steps=10), progress=False)
    assert json.loads((out/'cohort.json').read_text())['identity']['options']['sampler'] == 'ddpm'

# -- issue 24, item 1: mode 'insert', a lesion inserted into real training films, each kept beside its edited twin -----

TINY_INSERT = dict(mode='insert', insert_steps=2, insert_jump=1, insert_resample=1, guidance={})   # a 2-step RePaint, one pass a step

def insert_request(tmp, **kw):
    return base(tmp, **{'counts': {'nodule': 2, 'effusion': 1}, 'steps': None, 'batch_size': 2, 'dicom': True, **TINY_INSERT, **kw})

@pytest.fixture(scope='module')
def insert_cohort(tmp_path_factory):
    torch.set_num_threads(2)
    return build_cohort(insert_request(tmp_path_factory.mktemp('insert')), progress=False)

def _png(p): return np.asarray(Image.open(p))

def test_insert_mode_writes_counterfactual_pairs(insert_cohort, real):
    from cxr_diffusion_nbs.inpainting import lesion_region
    out = insert_cohort
    m = load_cohort(out)
    im = m.images.set_index('image_id')
    edited, originals = im[im.synthetic == 1], im[im.synthetic == 0]
    assert list(edited.index) == ['ins_000000', 'ins_000001', 'ins_000002'] and len(originals) == 3
    assert list(edited.target_finding) == ['nodule', 'nodule', 'effusion'] and (edited.source == 'synthetic inserted').all()
    masks = m.annotations.set_index('image_id')
    assert list(masks.index) == list(edited.index) and list(masks.finding) == list(edited.target_finding)
    train = real.images[real.images.split == 'train'].set_index('image_id')
    for iid, r in edited.iterrows():
        o = im.loc[r.twin_of]
        assert Path(o.path).parent.name == 'originals' and o.twin_of == iid and o.pair_id == r.pair_id
        assert o.patient_id == r.patient_id and o.patient_id.startswith('patient_') and o.source == 'real original'
        assert (r[r.target_finding], o[r.target_finding]) == (1., 0.)             # the edit positive, its original negative
        assert o.recipient_image_id == r.recipient_image_id and o.recipient_image_id in train.index   # (private/, read back)
        assert train.loc[o.recipient_image_id, r.target_finding] == 0 and r.donor_image_id in train.index
        e, orig = _png(r.path), _png(o.path)
        region = lesion_region(torch.from_numpy(_png(masks.loc[iid, 'mask_path']) / 255.), 2).numpy() > .5
        assert np.array_equal(e[~region], orig[~region]) and not np.array_equal(e[region], orig[region])
        prov = json.loads(Image.open(r.path).text['Provenance'])
        assert prov['mode'] == 'insert' and prov['target_finding'] == r.target_finding and prov['seed'] == r.seed
        assert {k: prov[k] for k in ('insert_steps', 'insert_jump', 'insert_resample', 'insert_dilate', 'insert_feather')} == \
               dict(insert_steps=2, insert_jump=1, insert_resample=1, insert_dilate=2, insert_feather=2)
        assert prov['mask_jitter'] == json.loads(r.mask_jitter) and prov['twin_of'] == r.twin_of and prov['recipient_ref'] == r.recipient_ref
        assert 'EDITED' in Image.open(r.path).text['Description'] and 'REAL' in Image.open(o.path).text['Description']
        d = pydicom.dcmread(out/r.dicom_path)
        assert d.ConversionType == 'SYN' and 'EDITED' in d.SeriesDescription and list(d.ImageType)[:2] == ['DERIVED', 'SECONDARY']
        np.testing.assert_array_equal(d.pixel_array[0] if d.pixel_array.ndim == 3 else d.pixel_array, e)
    assert originals.dicom_path.fillna('').eq('').all() and originals.model_sha256.fillna('').eq('').all()
    # no recipient's or donor's real id, no patient id, no machine path in any shared file
    needles = {*real.images.image_id, *real.images.patient_id, *(Path(p).stem for p in real.images.path),
               str(out.parent), str(project_root()), str(sample_data_root()), str(Path.home())}
    assert scan_shared(out, needles) == []
    key = cohort_key(out)
    private = pd.read_csv(out/'private'/'recipients.csv', dtype=str)
    assert set(private.recipient_ref) == set(edited.recipient_ref)
    assert all(donor_ref(key, i, 'recipient') == r for i, r in zip(private.recipient_image_id, private.recipient_ref))
    assert 'recipients.csv' in (out/'private'/'README.md').read_text() and 'originals/' in (out/'README.md').read_text()
    meta = json.loads((out/'cohort.json').read_text())
    assert meta['identity']['mode'] == 'insert' and meta['identity']['options'] == {'guidance': {}, 'guidance_mode': 'nested'}
    assert {meta['identity'][k] for k in ('sampler', 'steps', 'eta')} == {None}      # RePaint: no sampler claimed

def test_insert_mode_resumes_after_a_kill_as_the_uninterrupted_run(insert_cohort, tmp_path):
    "The uninterrupted cohort, copied as a kill in the last pair's record leaves it: that pair half rewritten, its record torn."
    killed = tmp_path/'killed'; shutil.copytree(insert_cohort, killed)
    for f in ('images.csv', 'annotations.csv', 'manifest.json'): (killed/f).unlink()     # (a finished build's last files)
    lines = (killed/'records.jsonl').read_text().splitlines()
    (killed/'records.jsonl').write_text('\n'.join(lines[:2]) + '\n' + lines[2][:25])       # a torn last line
    (killed/'originals'/'orig_000002.png').write_bytes(b'not what the resumed run writes')
    (killed/'images'/'ins_000002.png').unlink(); (killed/'dicom'/'ins_000002.dcm').unlink()
    (killed/'images'/'.ins_000002.png.k1lled_x.png').write_bytes(b'half a PNG')
    req = insert_request(tmp_path, output_dir=str(killed))
    with pytest.raises(CohortError, match='different cohort'): build_cohort(dict(req, insert_steps=3), progress=False)
    build_cohort(req, progress=False)
    a, b = load_cohort(insert_cohort), load_cohort(killed)
    assert list(a.images.image_id) == list(b.images.image_id) and len((killed/'records.jsonl').read_text().splitlines()) == 4
    for pa, pb in zip(a.images.path, b.images.path): np.testing.assert_array_equal(_png(pa), _png(pb))
    cols = ['image_id', 'pair_id', 'twin_of', 'target_finding', 'seed', 'mask_jitter', 'recipient_image_id', 'donor_image_id']
    pd.testing.assert_frame_equal(a.images[cols], b.images[cols])
    assert not [q for q in killed.rglob('.*') if q.is_file()]

@pytest.mark.parametrize('kw, field', [(dict(insert_feather=3), "'insert_feather'"), (dict(insert_steps=0), "'insert_steps'"),
                                       (dict(insert_resample=2, insert_jump=2), "'insert_jump'"), (dict(steps=10), "'steps'"),
                                       (dict(sampler='ddim'), "'sampler'"), (dict(co_occurring=False), "'co_occurring'"),
                                       (dict(mode='paste'), "'mode'"), (dict(mode='generate', insert_steps=5), "'insert_steps'.*mode 'insert'"),
                                       (dict(counts={'hernia': 1}), 'not trained on')])
def test_insert_mode_refusals_name_the_field_and_write_nothing(tmp_path, kw, field):
    with pytest.raises(CohortError, match=field): build_cohort(insert_request(tmp_path, **kw), progress=False)
    assert not (tmp_path/'cohort').exists()

def test_insert_mode_refuses_a_gan_before_writing(tmp_path):
    with pytest.raises(CohortError, match="field 'mode': 'insert' edits real films.*gan generator cannot"):
        build_cohort(insert_request(tmp_path, checkpoint=str(GAN)), progress=False)
    assert not (tmp_path/'cohort').exists()

def test_insert_config_is_the_rarity_studys_insertion():
    from cxr_diffusion_nbs.rarity import RarityConfig
    from cxr_diffusion_nbs.cohort import INSERT_FIELDS, INSERT_JITTER
    cfg, _ = load_cohort_config(project_root()/'configs'/'cohort_insert.yaml')
    assert cfg.mode == 'insert' and cfg.checkpoint == 'data/models/cpu256_latent_demo' and set(cfg.counts.values()) == {5}
    assert {k: getattr(cfg, k) for k in INSERT_FIELDS} == {k: getattr(RarityConfig(), k) for k in INSERT_FIELDS}
    assert dict(shift=cfg.shift, rotate=cfg.rotate, lesion_scale=cfg.lesion_scale, min_inside=cfg.min_inside) == INSERT_JITTER
    assert 'mode' not in CohortConfig().to_dict() and CohortConfig(mode='insert').to_dict()['insert_steps'] == 20

def test_mix_draws_an_insert_cohorts_edited_films_only(insert_cohort, real):
    m = load_cohort(insert_cohort)
    edited = set(m.images.image_id[m.images.synthetic == 1])
    n_real = len(real.subset(split='train', findings=m.findings).images)
    mix = mix_real_synthetic(real, m, ratio=len(edited) / n_real)          # every edited film, no unedited original twice
    assert set(mix.images.image_id[mix.images.synthetic == 1]) == edited and len(mix.images) == n_real + len(edited)
    val_id = real.images.image_id[real.images.split == 'val'].iloc[0]
    leaky = Manifest(m.images.assign(recipient_image_id=val_id), m.annotations, m.findings, m.root, 'leaky')
    with pytest.raises(PatientLeakageError, match="'recipient_image_id'.*the edited films would leak"): mix_real_synthetic(real, leaky, ratio=.001)
