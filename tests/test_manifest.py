"Integration tests of the manifest schema and the dataset adapters (fixtures in tests/fixtures/, images made in tmp_path)."
import json, shutil
from pathlib import Path

import numpy as np, pandas as pd, pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_diffusion_nbs.core import NIH_FINDINGS, RARE_FINDINGS, ManifestError, sample_data_root
from cxr_diffusion_nbs.manifest import (Manifest, validate_manifest, load_shared_subset, load_nih_chestxray14,
                                        load_chexpert, load_mimic_cxr_jpg, load_siim_acr, load_vindr_cxr,
                                        load_chestx_det, ANNOTATION_COLUMNS, IMAGE_COLUMNS)

FIX = Path(__file__).parent/'fixtures'


def touch_image(path):
    "8x8 placeholder: PNG/JPEG via Pillow, a minimal valid DICOM via pydicom for .dcm/.dicom."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    px = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    if path.suffix in ('.dcm', '.dicom'):
        meta = FileMetaDataset(); meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.7'
        meta.MediaStorageSOPInstanceUID = generate_uid(); meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset(); ds.file_meta = meta
        ds.Rows = ds.Columns = 8; ds.SamplesPerPixel = 1; ds.PhotometricInterpretation = 'MONOCHROME2'
        ds.BitsAllocated = ds.BitsStored = 8; ds.HighBit = 7; ds.PixelRepresentation = 0; ds.PixelData = px.tobytes()
        ds.save_as(path, enforce_file_format=True)
    else:
        Image.fromarray(px).save(path)


def write_csv(df, path):
    df.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------- fixtures with their images

@pytest.fixture
def nih_dir(tmp_path):
    d = tmp_path/'nih'
    for i, n in enumerate(pd.read_csv(FIX/'nih'/'Data_Entry_2017.csv')['Image Index']):
        touch_image(d/f'images_00{1 + i % 2}'/'images'/n)   # Kaggle layout, two sub-folders
    return d

@pytest.fixture
def chexpert_dir(tmp_path):
    d = tmp_path/'chexpert'
    for p in pd.read_csv(FIX/'chexpert'/'train.csv')['Path']: touch_image(d/p)
    return d

@pytest.fixture
def mimic_dir(tmp_path):
    d = tmp_path/'mimic'
    meta = pd.read_csv(FIX/'mimic'/'mimic-cxr-2.0.0-metadata.csv', dtype=str)
    for i, s, t in zip(meta.dicom_id, meta.subject_id, meta.study_id):
        touch_image(d/'files'/f'p{s[:2]}'/f'p{s}'/f's{t}'/f'{i}.jpg')
    return d

@pytest.fixture
def siim_dir(tmp_path):
    d = tmp_path/'siim'
    for i in pd.read_csv(FIX/'siim'/'train-rle.csv').ImageId.unique():
        touch_image(d/'dicom-images-train'/f'{i}.1'/f'{i}.2'/f'{i}.dcm')
    return d

@pytest.fixture
def vindr_dir(tmp_path):
    d = tmp_path/'vindr'
    for i in pd.read_csv(FIX/'vindr'/'annotations_train.csv').image_id.unique(): touch_image(d/'train'/f'{i}.dicom')
    return d

@pytest.fixture
def cxd_dir(tmp_path):
    d = tmp_path/'chestx_det'
    for e in json.loads((FIX/'chestx_det'/'ChestX_Det_train.json').read_text()): touch_image(d/'train'/e['file_name'])
    return d


def check_schema(m: Manifest):
    assert list(m.images.columns[:len(IMAGE_COLUMNS)]) == list(IMAGE_COLUMNS)
    assert list(m.images.columns[len(IMAGE_COLUMNS):len(IMAGE_COLUMNS) + len(m.findings)]) == m.findings
    assert m.findings[:14] == list(NIH_FINDINGS)
    assert list(m.annotations.columns) == list(ANNOTATION_COLUMNS)
    assert m.images.image_id.is_unique
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in m.images.path)
    vals = m.images[m.findings].to_numpy(float)
    assert np.isin(vals[~np.isnan(vals)], [0, 1]).all()
    validate_manifest(m)


# ---------------------------------------------------------------- the real sample

def test_shared_sample_counts():
    root = sample_data_root()
    m = load_shared_subset(root)
    check_schema(m)
    raw = pd.read_csv(root/'manifest.csv', dtype=str, keep_default_na=False)
    assert len(m) == 372 == len(raw)
    assert (m.annotations.kind == 'box').sum() == len(pd.read_csv(root/'boxes.csv'))
    n_masks = sum(len([p for p in s.split('|') if p]) for s in raw.seg_mask_paths)
    assert (m.annotations.kind == 'mask').sum() == n_masks == 313
    assert set(m.images.split) == {'train', 'val'}
    assert 'no_finding' not in m.findings and 'no_finding' in m.images
    # labels are the published ones
    pub = raw.set_index('image_id')
    im = m.images.set_index('image_id')
    for f in NIH_FINDINGS: assert (im[f].astype(int).astype(str) == pub.loc[im.index, f]).all(), f
    # mask rows: finding from the file name, frame 256, file exists, extent known from segments.csv
    mk = m.annotations[m.annotations.kind == 'mask']
    assert all(Path(p).name == f'{i}_seg_{f}.png' for i, f, p in zip(mk.image_id, mk.finding, mk.mask_path))
    assert (mk.frame_width == 256).all() and mk[['x_min', 'x_max']].notna().all().all()
    assert {'calcification', 'diffuse_nodule', 'fracture'} <= set(m.findings)
    one = m.annotations_for(mk.image_id.iloc[0])
    assert set(one.image_id) == {mk.image_id.iloc[0]} and len(one) >= 1


def test_find_data_root_default(monkeypatch):
    monkeypatch.setenv('CXR_DATA_ROOT', str(sample_data_root()))
    assert len(load_shared_subset()) == 372


def test_subset_and_roundtrip(tmp_path):
    m = load_shared_subset(sample_data_root())
    r = m.subset(split='val', findings=RARE_FINDINGS)
    assert set(r.images.split) == {'val'} and r.findings == list(RARE_FINDINGS)
    assert set(r.annotations.finding) <= set(RARE_FINDINGS) and set(r.annotations.image_id) <= set(r.images.image_id)
    assert 'atelectasis' not in r.images.columns
    with pytest.raises(ManifestError, match="field 'lung_cancer'"): m.subset(findings=['lung_cancer'])
    with pytest.raises(ManifestError, match="field 'split'"): m.subset(split='test')
    m.to_csv(tmp_path/'out')
    assert not [p for p in (tmp_path/'out').iterdir() if p.name.startswith('.')]   # no temp files left
    back = Manifest.from_csv(tmp_path/'out', check_files=True)
    assert back.findings == m.findings and back.name == m.name
    pd.testing.assert_frame_equal(back.annotations, m.annotations, check_dtype=False)
    pd.testing.assert_frame_equal(back.images[list(IMAGE_COLUMNS) + m.findings], m.images[list(IMAGE_COLUMNS) + m.findings],
                                  check_dtype=False)


# ---------------------------------------------------------------- validation errors

def test_validation_errors():
    m = load_shared_subset(sample_data_root())
    def make(images=None, ann=None, findings=None):
        return Manifest(m.images if images is None else images, m.annotations if ann is None else ann,
                        m.findings if findings is None else findings, m.root, 'edited.csv')
    dup = pd.concat([m.images, m.images.iloc[[3]]])
    with pytest.raises(ManifestError, match=rf"field 'image_id'.*{m.images.image_id.iloc[3]}"): make(dup).validate(False)
    with pytest.raises(ManifestError, match="field 'effusion'"): make(m.images.assign(effusion=2.0)).validate(False)
    with pytest.raises(ManifestError, match="field 'lung_cancer'.*no such label column"): make(findings=m.findings + ['lung_cancer']).validate(False)
    ann = m.annotations.copy(); ann.loc[0, 'image_id'] = 'nih_unknown'
    with pytest.raises(ManifestError, match="field 'image_id'.*nih_unknown"): make(ann=ann).validate(False)
    ann = m.annotations.copy(); ann.loc[0, 'finding'] = 'lung_cancer'
    with pytest.raises(ManifestError, match="field 'finding'.*lung_cancer"): make(ann=ann).validate(False)
    ann = m.annotations.copy(); ann.loc[0, 'y_min'], ann.loc[0, 'y_max'] = ann.loc[0, 'y_max'], ann.loc[0, 'y_min']
    with pytest.raises(ManifestError, match="field 'y_min'"): make(ann=ann).validate(False)
    ann = m.annotations.copy(); ann.loc[0, 'kind'] = 'circle'
    with pytest.raises(ManifestError, match="field 'kind'"): make(ann=ann).validate(False)
    im = m.images.copy(); im.loc[5, 'path'] = '/no/such/file.png'
    with pytest.raises(ManifestError, match="/no/such/file.png: field 'path'"): make(im).validate(True)
    make(im).validate(check_files=False)   # only the file is wrong


def test_shared_layout_errors(tmp_path):
    root = tmp_path/'subset'
    shutil.copytree(sample_data_root(), root)
    man = pd.read_csv(root/'manifest.csv', dtype=str, keep_default_na=False)
    write_csv(man.drop(columns='patient_id'), root/'manifest.csv')
    with pytest.raises(ManifestError, match="manifest.csv: field 'patient_id'"): load_shared_subset(root)
    write_csv(pd.concat([man, man.iloc[[0]]]), root/'manifest.csv')
    with pytest.raises(ManifestError, match=f"field 'image_id'.*{man.image_id[0]}"): load_shared_subset(root)
    write_csv(man, root/'manifest.csv')
    (root/man.path[7]).unlink()
    with pytest.raises(ManifestError, match=f"{Path(man.path[7]).name}: field 'path'"): load_shared_subset(root)
    assert len(load_shared_subset(root, missing='drop')) == 371


# ---------------------------------------------------------------- NIH ChestX-ray14

def test_nih(nih_dir):
    m = load_nih_chestxray14(FIX/'nih'/'Data_Entry_2017.csv', nih_dir, bbox_csv=FIX/'nih'/'BBox_List_2017.csv',
                             split_lists=[FIX/'nih'/'train_val_list.txt', FIX/'nih'/'test_list.txt'])
    check_schema(m)
    im = m.images.set_index('image_id')
    assert len(im) == 6 and im.loc['nih_00000001_001', 'patient_id'] == 'nih_00001'
    assert im.loc['nih_00000013_005', ['emphysema', 'infiltration', 'pleural_thickening', 'pneumothorax', 'mass']].tolist() == [1, 1, 1, 1, 0]
    assert im.loc['nih_00000002_000', 'no_finding'] == 1 and im.loc['nih_00000002_000', list(NIH_FINDINGS)].sum() == 0
    assert im.loc['nih_00000013_005', 'view'] == 'AP' and im.loc['nih_00000001_000', 'age'] == 58
    assert im.split.to_dict() == {'nih_00000001_000': 'train_val', 'nih_00000001_001': 'train_val', 'nih_00000002_000': 'test',
                                  'nih_00000003_000': 'test', 'nih_00000013_005': 'train_val', 'nih_00000030_001': 'train_val'}
    assert (im.width == 1024).all() and im.loc['nih_00000001_000', 'orig_width'] == 2682
    a = m.annotations
    assert len(a) == 4 and set(a.kind) == {'box'} and (a.frame_width == 1024).all()
    inf = a[a.finding == 'infiltration'].iloc[0]     # published as 'Infiltrate'
    assert inf.image_id == 'nih_00000030_001'
    np.testing.assert_allclose(inf[['x_min', 'y_min', 'x_max', 'y_max']].astype(float), [580.2, 390.4, 580.2 + 230.6, 390.4 + 280.0])
    assert len(m.annotations_for('nih_00000030_001')) == 2


def test_nih_errors(nih_dir, tmp_path):
    de = pd.read_csv(FIX/'nih'/'Data_Entry_2017.csv', dtype=str, keep_default_na=False)
    bad = write_csv(de.drop(columns=['Patient ID']), tmp_path/'Data_Entry_nopid.csv')
    with pytest.raises(ManifestError, match="Data_Entry_nopid.csv: field 'Patient ID'"): load_nih_chestxray14(bad, nih_dir)
    dup = write_csv(pd.concat([de, de.iloc[[2]]]), tmp_path/'Data_Entry_dup.csv')
    with pytest.raises(ManifestError, match="field 'image_id'.*nih_00000002_000"): load_nih_chestxray14(dup, nih_dir)
    bb = pd.read_csv(FIX/'nih'/'BBox_List_2017.csv', dtype=str, keep_default_na=False)
    nob = write_csv(bb.drop(columns=['h]']), tmp_path/'BBox_noh.csv')
    with pytest.raises(ManifestError, match=r"BBox_noh.csv: field 'h\]'"):
        load_nih_chestxray14(FIX/'nih'/'Data_Entry_2017.csv', nih_dir, bbox_csv=nob)
    other = write_csv(bb.assign(**{'Image Index': '99999999_000.png'}), tmp_path/'BBox_other.csv')
    with pytest.raises(ManifestError, match="field 'Image Index'.*99999999_000"):
        load_nih_chestxray14(FIX/'nih'/'Data_Entry_2017.csv', nih_dir, bbox_csv=other)
    gone = next(nih_dir.rglob('00000003_000.png')); gone.unlink()
    with pytest.raises(ManifestError, match="00000003_000.png: field 'path'"):
        load_nih_chestxray14(FIX/'nih'/'Data_Entry_2017.csv', nih_dir)
    assert len(load_nih_chestxray14(FIX/'nih'/'Data_Entry_2017.csv', nih_dir, missing='drop')) == 5


# ---------------------------------------------------------------- CheXpert

ROW2 = 'chexpert_patient00002_study2_view1_frontal'

def test_chexpert_policies(chexpert_dir):
    csv = FIX/'chexpert'/'train.csv'
    ms = {p: load_chexpert(csv, chexpert_dir, uncertainty=p) for p in ('ignore', 'ones', 'zeros')}
    for m in ms.values(): check_schema(m)
    r = {p: m.images.set_index('image_id').loc[ROW2] for p, m in ms.items()}
    for f in ('cardiomegaly', 'edema', 'consolidation', 'atelectasis', 'effusion'):
        assert np.isnan(r['ignore'][f]) and r['ones'][f] == 1 and r['zeros'][f] == 0, f
    assert r['ignore']['lung_opacity'] == 1 and r['ignore']['fracture'] == 1 and r['ignore']['pneumothorax'] == 0
    assert np.isnan(r['ignore']['nodule']) and np.isnan(r['ignore']['mass'])    # not graded by CheXpert
    im = ms['ignore'].images.set_index('image_id')
    assert im.loc['chexpert_patient00001_study1_view1_frontal', 'no_finding'] == 1
    assert im.loc['chexpert_patient00002_study1_view2_lateral', 'view'] == 'LATERAL'
    assert im.patient_id.nunique() == 4 and set(im.split) == {'train'}
    # per-finding dict (published or canonical names), blanks as NaN, frontal only
    m = load_chexpert(csv, chexpert_dir, uncertainty={'Atelectasis': 'ones', 'edema': 'zeros'}, blank='nan', frontal_only=True)
    x = m.images.set_index('image_id').loc[ROW2]
    assert x.atelectasis == 1 and x.edema == 0 and np.isnan(x.cardiomegaly) and np.isnan(x.pneumothorax)
    assert len(m) == 5 and 'LATERAL' not in set(m.images.view)
    # root may be the CheXpert-v1.0-small folder itself; split can be forced
    m = load_chexpert(csv, chexpert_dir/'CheXpert-v1.0-small', split='val')
    assert len(m) == 6 and set(m.images.split) == {'val'}


def test_chexpert_errors(chexpert_dir, tmp_path):
    csv = FIX/'chexpert'/'train.csv'
    with pytest.raises(ManifestError, match="field 'uncertainty'"): load_chexpert(csv, chexpert_dir, uncertainty='maybe')
    with pytest.raises(ManifestError, match="field 'uncertainty'"): load_chexpert(csv, chexpert_dir, uncertainty={'Edema': 'half'})
    with pytest.raises(ManifestError, match="field 'uncertainty'.*Lung Cancer"): load_chexpert(csv, chexpert_dir, uncertainty={'Lung Cancer': 'ones'})
    with pytest.raises(ManifestError, match="field 'blank'"): load_chexpert(csv, chexpert_dir, blank='ones')
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    nocol = write_csv(df.drop(columns=['Pleural Effusion']), tmp_path/'train_nocol.csv')
    with pytest.raises(ManifestError, match="train_nocol.csv: field 'Pleural Effusion'"): load_chexpert(nocol, chexpert_dir)
    badval = df.copy(); badval.loc[0, 'Edema'] = '2.0'
    with pytest.raises(ManifestError, match="field 'Edema'.*2.0"): load_chexpert(write_csv(badval, tmp_path/'t.csv'), chexpert_dir)
    badval.loc[0, 'Edema'] = 'yes'
    with pytest.raises(ManifestError, match="field 'Edema'.*yes"): load_chexpert(write_csv(badval, tmp_path/'t.csv'), chexpert_dir)
    dup = write_csv(pd.concat([df, df.iloc[[1]]]), tmp_path/'train_dup.csv')
    with pytest.raises(ManifestError, match=f"field 'image_id'.*{ROW2}"): load_chexpert(dup, chexpert_dir)
    (chexpert_dir/df.Path[3]).unlink()
    with pytest.raises(ManifestError, match="view2_lateral.jpg: field 'path'"): load_chexpert(csv, chexpert_dir)
    assert len(load_chexpert(csv, chexpert_dir, frontal_only=True)) == 5   # the missing file is the lateral one


# ---------------------------------------------------------------- MIMIC-CXR-JPG

def test_mimic(mimic_dir):
    f = FIX/'mimic'
    m = load_mimic_cxr_jpg(f/'mimic-cxr-2.0.0-metadata.csv', f/'mimic-cxr-2.0.0-chexpert.csv', mimic_dir,
                           split_csv=f/'mimic-cxr-2.0.0-split.csv')
    check_schema(m)
    im = m.images
    assert im.split.tolist() == ['train', 'train', 'train', 'val', 'test']
    assert im.patient_id.tolist()[:3] == ['mimic_10000032'] * 3
    assert im.path[3].endswith('files/p10/p10000764/s57375967/3d4e5f6a-dddddddd-eeeeeeee-ffffffff-00000000.jpg')
    assert im.width[0] == 2544 and im.height[0] == 3056 and im.view[1] == 'LATERAL' and im.view[4] == ''
    assert (im.no_finding[:3] == 1).all()                  # the study's labels go to all its images
    assert im.consolidation[3] == 1 and np.isnan(im.pneumonia[3])   # -1 ignored
    assert im.iloc[4][m.findings].isna().all()            # study without labels
    m1 = load_mimic_cxr_jpg(f/'mimic-cxr-2.0.0-metadata.csv', f/'mimic-cxr-2.0.0-chexpert.csv', mimic_dir/'files', uncertainty='ones')
    assert m1.images.pneumonia[3] == 1 and set(m1.images.split) == {''}


def test_mimic_errors(mimic_dir, tmp_path):
    f = FIX/'mimic'
    meta = pd.read_csv(f/'mimic-cxr-2.0.0-metadata.csv', dtype=str, keep_default_na=False)
    labs = pd.read_csv(f/'mimic-cxr-2.0.0-chexpert.csv', dtype=str, keep_default_na=False)
    with pytest.raises(ManifestError, match="meta.csv: field 'ViewPosition'"):
        load_mimic_cxr_jpg(write_csv(meta.drop(columns='ViewPosition'), tmp_path/'meta.csv'), f/'mimic-cxr-2.0.0-chexpert.csv', mimic_dir)
    with pytest.raises(ManifestError, match="labels.csv: field 'No Finding'"):
        load_mimic_cxr_jpg(f/'mimic-cxr-2.0.0-metadata.csv', write_csv(labs.drop(columns='No Finding'), tmp_path/'labels.csv'), mimic_dir)
    with pytest.raises(ManifestError, match="field 'image_id'"):
        load_mimic_cxr_jpg(write_csv(pd.concat([meta, meta.iloc[[0]]]), tmp_path/'meta2.csv'), f/'mimic-cxr-2.0.0-chexpert.csv', mimic_dir)
    split = pd.read_csv(f/'mimic-cxr-2.0.0-split.csv', dtype=str).assign(split='holdout')
    with pytest.raises(ManifestError, match="split.csv: field 'split'"):
        load_mimic_cxr_jpg(f/'mimic-cxr-2.0.0-metadata.csv', f/'mimic-cxr-2.0.0-chexpert.csv', mimic_dir,
                           split_csv=write_csv(split, tmp_path/'split.csv'))


# ---------------------------------------------------------------- SIIM-ACR

def test_siim(siim_dir):
    m = load_siim_acr(FIX/'siim'/'train-rle.csv', siim_dir)
    check_schema(m)
    assert m.images.pneumothorax.tolist() == [0, 1, 0, 1]
    assert m.images[[f for f in NIH_FINDINGS if f != 'pneumothorax']].isna().all().all()
    assert (m.images.patient_id == m.images.image_id).all()
    a = m.annotations
    assert len(a) == 3 and set(a.kind) == {'rle'} and (a.frame_width == 1024).all()
    assert a.image_id.value_counts().max() == 2                       # two lesions, two rows
    assert a.rle[0] == '614700 20 1004 22 1002 25 999 20'              # stored as published (relative)
    assert a.iloc[0][['x_min', 'y_min', 'x_max', 'y_max']].tolist() == [600, 300, 604, 325]
    s2 = load_siim_acr(FIX/'siim'/'stage_2_train.csv', siim_dir)    # header without the leading space
    assert s2.annotations.rle.tolist() == a.rle.tolist() and len(s2) == 3
    pid = {i[len('siim_'):]: 'patient_a' for i in m.images.image_id}
    assert set(load_siim_acr(FIX/'siim'/'train-rle.csv', siim_dir, patient_ids=pid).images.patient_id) == {'siim_patient_a'}


def test_siim_absolute_rle(siim_dir, tmp_path):
    "Absolute 1-based starts (standard Kaggle RLE) are converted to the relative form; 'auto' detects them."
    df = pd.read_csv(FIX/'siim'/'train-rle.csv')
    df.columns = ['ImageId', 'EncodedPixels']
    b0 = 600 * 1024 + 300
    absolute = f'{b0 + 1} 20 {b0 + 1024 + 1} 22 {b0 + 2048 + 1} 25 {b0 + 3072 + 1} 20'
    df.loc[1, 'EncodedPixels'] = absolute
    p = write_csv(df, tmp_path/'mixed.csv')          # 'auto' decides per string
    m = load_siim_acr(p, siim_dir, rle_format='auto')
    assert m.annotations.rle.tolist() == ['614700 20 1004 22 1002 25 999 20', '307400 10 1014 12 1012 10', '512300 5 1019 6 1018 5']
    only = write_csv(df.iloc[[0, 1]], tmp_path/'abs.csv')
    m = load_siim_acr(only, siim_dir, rle_format='absolute', missing='drop')
    assert m.annotations.rle.tolist() == ['614700 20 1004 22 1002 25 999 20']
    assert m.annotations.iloc[0][['x_min', 'y_min', 'x_max', 'y_max']].tolist() == [600, 300, 604, 325]
    with pytest.raises(ManifestError, match="mixed.csv: field 'EncodedPixels'"): load_siim_acr(p, siim_dir, rle_format='relative')
    with pytest.raises(ManifestError, match="mixed.csv: field 'EncodedPixels'"): load_siim_acr(p, siim_dir, rle_format='absolute')


def test_siim_errors(siim_dir, tmp_path):
    df = pd.read_csv(FIX/'siim'/'train-rle.csv')
    with pytest.raises(ManifestError, match="x.csv: field 'EncodedPixels'"):
        load_siim_acr(write_csv(df[['ImageId']], tmp_path/'x.csv'), siim_dir)
    df2 = df.copy(); df2.iloc[1, 1] = '12 x 3'
    with pytest.raises(ManifestError, match="field 'EncodedPixels'"): load_siim_acr(write_csv(df2, tmp_path/'y.csv'), siim_dir)
    next(siim_dir.rglob('*10013*.dcm')).unlink()
    with pytest.raises(ManifestError, match=r"10013.1517875220.962448.dcm: field 'path'"): load_siim_acr(FIX/'siim'/'train-rle.csv', siim_dir)


# ---------------------------------------------------------------- VinDr-CXR

A, B, C = '50a418190bc3fb1ef1633bf9678929b3', '9a5094b2563a1ef3ff50dc5c7ff71345', '051132a778e61a86eb147c7c6f564dfe'

def test_vindr(vindr_dir):
    m = load_vindr_cxr(FIX/'vindr'/'annotations_train.csv', vindr_dir)
    check_schema(m)
    im = m.images.set_index('image_id')
    assert im.loc['vindr_' + A, 'no_finding'] == 1 and im.loc['vindr_' + A, ['cardiomegaly', 'effusion']].tolist() == [0, 0]
    assert im.loc['vindr_' + B, ['cardiomegaly', 'effusion', 'aortic_enlargement']].tolist() == [1, 1, 0]
    assert im.loc['vindr_' + C, ['nodule_or_mass', 'fibrosis', 'aortic_enlargement']].tolist() == [1, 1, 1]
    assert np.isnan(im.loc['vindr_' + C, 'nodule']) and np.isnan(im.loc['vindr_' + B, 'pneumonia'])
    assert {'aortic_enlargement', 'interstitial_lung_disease', 'lung_opacity', 'other_lesion', 'nodule_or_mass'} <= set(m.findings)
    a = m.annotations
    assert len(a) == 7 and a.frame_width.isna().all() and set(a.kind) == {'box'}
    assert sorted(a[a.image_id == 'vindr_' + B].rater) == ['R10', 'R10', 'R8']
    assert im.split.unique().tolist() == ['train']
    g = load_vindr_cxr(FIX/'vindr'/'annotations_train.csv', vindr_dir, image_labels_csv=FIX/'vindr'/'image_labels_train.csv')
    check_schema(g)
    gi = g.images.set_index('image_id')
    assert gi.loc['vindr_' + B, 'pneumonia'] == 1 and gi.loc['vindr_' + A, 'pneumonia'] == 0
    assert gi.loc['vindr_' + C, ['lung_tumor', 'copd']].tolist() == [1, 0]


def test_vindr_errors(vindr_dir, tmp_path):
    df = pd.read_csv(FIX/'vindr'/'annotations_train.csv', dtype=str, keep_default_na=False)
    with pytest.raises(ManifestError, match="a.csv: field 'class_name'"):
        load_vindr_cxr(write_csv(df.drop(columns='class_name'), tmp_path/'a.csv'), vindr_dir)
    e = df.copy(); e.loc[3, 'x_min'] = ''
    with pytest.raises(ManifestError, match="b.csv: field 'x_min'"): load_vindr_cxr(write_csv(e, tmp_path/'b.csv'), vindr_dir)
    lab = pd.read_csv(FIX/'vindr'/'image_labels_train.csv', dtype=str); lab.loc[0, 'COPD'] = '3'
    with pytest.raises(ManifestError, match="l.csv: field 'COPD'"):
        load_vindr_cxr(FIX/'vindr'/'annotations_train.csv', vindr_dir, image_labels_csv=write_csv(lab, tmp_path/'l.csv'))
    (vindr_dir/'train'/f'{C}.dicom').unlink()
    with pytest.raises(ManifestError, match=f"{C}.dicom: field 'path'"): load_vindr_cxr(FIX/'vindr'/'annotations_train.csv', vindr_dir)


# ---------------------------------------------------------------- ChestX-Det

def test_chestx_det(cxd_dir):
    m = load_chestx_det(FIX/'chestx_det'/'ChestX_Det_train.json', cxd_dir)
    check_schema(m)
    im = m.images.set_index('image_id')
    assert im.loc['chestxdet_36199', ['effusion', 'nodule', 'mass']].tolist() == [1, 1, 0]
    assert im.loc['chestxdet_36200', 'no_finding'] == 1 and np.isnan(im.loc['chestxdet_36200', 'pneumonia'])
    assert im.loc['chestxdet_36201', ['diffuse_nodule', 'pleural_thickening']].tolist() == [1, 1]
    assert set(im.split) == {'train'}
    a = m.annotations
    assert a.kind.tolist() == ['polygon', 'polygon', 'box', 'polygon', 'polygon']
    p = a.iloc[0]
    assert json.loads(p.points) == [[712, 610], [905, 700], [890, 920], [720, 880]]
    assert [p.x_min, p.y_min, p.x_max, p.y_max] == [712, 610, 905, 920] and p.frame_width == 1024
    assert a.iloc[2][['x_min', 'y_min', 'x_max', 'y_max']].tolist() == [200, 300, 460, 700]   # 2-point polygon -> box


def test_chestx_det_errors(cxd_dir, tmp_path):
    entries = json.loads((FIX/'chestx_det'/'ChestX_Det_train.json').read_text())
    bad = [dict(e) for e in entries]; del bad[1]['polygons']
    (tmp_path/'a.json').write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="a.json: field 'polygons'"): load_chestx_det(tmp_path/'a.json', cxd_dir)
    bad = [dict(e) for e in entries]; bad[0]['boxes'] = bad[0]['boxes'][:1]
    (tmp_path/'b.json').write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="b.json: field 'boxes'"): load_chestx_det(tmp_path/'b.json', cxd_dir)
    (tmp_path/'c.json').write_text(json.dumps(entries + [entries[0]]))
    with pytest.raises(ManifestError, match="field 'image_id'.*chestxdet_36199"): load_chestx_det(tmp_path/'c.json', cxd_dir)
    (tmp_path/'d.json').write_text('{not json')
    with pytest.raises(ManifestError, match="d.json: field 'json'"): load_chestx_det(tmp_path/'d.json', cxd_dir)

# --- mixing real and synthetic images (moved here from cohort) --------------------------------------------------
def _stand_in_cohort(real, n=6):
    "A synthetic-cohort manifest made of real training rows (new ids, synthetic = 1, donors from the training split)."
    tr = real.images[real.images.split == 'train'].head(n)
    im = tr.assign(image_id=[f'syn_{i:06d}' for i in range(len(tr))], synthetic=1, donor_image_id=tr.image_id.values)
    return Manifest(im.reset_index(drop=True), real.annotations.iloc[:0], list(RARE_FINDINGS), real.root, 'stand_in')

def test_mix_real_synthetic_ratio_and_refusals():
    from cxr_diffusion_nbs.core import PatientLeakageError
    from cxr_diffusion_nbs.manifest import mix_real_synthetic
    real = load_shared_subset(sample_data_root())
    syn = _stand_in_cohort(real)
    n_real = int((real.images.split == 'train').sum())
    mixed = mix_real_synthetic(real, syn, ratio=4 / n_real, seed=1)
    assert int(mixed.images.synthetic.sum()) == 4 and int((mixed.images.synthetic == 0).sum()) == n_real
    assert mixed.findings == list(RARE_FINDINGS) and (mixed.images.split == 'train').all()
    assert mixed.images.equals(mix_real_synthetic(real, syn, ratio=4 / n_real, seed=1).images)   # seeded
    mixed.validate()
    with pytest.raises(ManifestError, match='needs'): mix_real_synthetic(real, syn, ratio=1.)
    with pytest.raises(ManifestError, match="'ratio'"): mix_real_synthetic(real, syn, ratio=float('nan'))
    with pytest.raises(ManifestError, match="'synthetic'"): mix_real_synthetic(real, real.subset(findings=list(RARE_FINDINGS)), ratio=.1)
    val_id = real.images.loc[real.images.split == 'val', 'image_id'].iloc[0]
    leaky = Manifest(syn.images.assign(donor_image_id=val_id), syn.annotations, syn.findings, syn.root, 'leaky')
    with pytest.raises(PatientLeakageError, match='donor_image_id'): mix_real_synthetic(real, leaky, ratio=.01)


# ---------------------------------------------------------------- issue 12: boxes outside their image
def test_nih_box_outside_the_image_refused_spilling_box_warned(nih_dir, tmp_path):
    bb = pd.read_csv(FIX/'nih'/'BBox_List_2017.csv', dtype=str, keep_default_na=False)
    far = write_csv(bb.assign(**{'Bbox [x': ['1100.0'] + list(bb['Bbox [x'][1:])}), tmp_path/'BBox_far.csv')
    with pytest.raises(ManifestError, match=r"Data_Entry_2017.csv: field 'x_min': 1 annotation\(s\), e.g. #0 \(image "
                                            r"nih_00000013_005, pneumothorax, box from NIH BBox_List_2017: x 1100..1387.3.* "
                                            r"1024x1024 frame\) lie wholly outside their image"):
        load_nih_chestxray14(FIX/'nih'/'Data_Entry_2017.csv', nih_dir, bbox_csv=far)
    spill = write_csv(bb.assign(**{'Bbox [x': ['1000.0'] + list(bb['Bbox [x'][1:])}), tmp_path/'BBox_spill.csv')
    with pytest.warns(UserWarning, match=r"field 'x_max': 1 annotation\(s\), e.g. #0 \(image nih_00000013_005.* spill over"):
        m = load_nih_chestxray14(FIX/'nih'/'Data_Entry_2017.csv', nih_dir, bbox_csv=spill)
    assert m.annotations.x_max.iloc[0] > 1024        # kept as published; clipped when rendered (02_masks)


def test_frame_from_image_size_when_the_annotation_has_none():
    m = load_shared_subset(sample_data_root())
    an = m.annotations.copy()
    an.loc[0, ['frame_width', 'frame_height']] = np.nan                # falls back to the image's 256 x 256
    an.loc[0, ['y_min', 'y_max']] = 260., 300.
    with pytest.raises(ManifestError, match=r"field 'y_min': .* in a 256x256 frame\) lie wholly outside"):
        Manifest(m.images, an, m.findings, m.root, 'edited', 'edited/annotations.csv').validate(check_files=False)
