"""22_modalities: Hounsfield units and CT windows on real pydicom CT files, the mammography reading rules on a
constructed file, modality presets in the config, and the data layer and the trainer honouring them."""
import warnings
from pathlib import Path
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from cxr_diffusion_nbs.core import ConfigError, ImageReadError, project_root
from cxr_diffusion_nbs.dataset import Augment, CXRDataset
from cxr_diffusion_nbs.image_io import read_dicom, read_image, write_dicom, write_png
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.modalities import (CT_WINDOWS, MODALITY_PRESETS, ModalityPreset, ModalityReader, ct_crops,
                                          ct_window, hounsfield_units, mammo_view, modality_dataset, modality_preset,
                                          orient_breast, slice_manifest, synthetic_mammogram)
from cxr_diffusion_nbs.training import load_config, make_dataset, train

CT_SMALL, CT_512 = get_testdata_file('CT_small.dcm'), get_testdata_file('693_J2KI.dcm')
CONFIGS = project_root()/'configs'

def test_hounsfield_units_follow_the_header():
    ds = pydicom.dcmread(CT_SMALL)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    hu = hounsfield_units(CT_SMALL)
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, ds.pixel_array.astype(np.float32) - 1024)
    assert (hu.min(), hu.max()) == (128 - 1024, 2191 - 1024)          # stored 128..2191 in this file
    assert -1100 < np.median(hounsfield_units(CT_512)) < -900          # the air around the head

def test_hounsfield_units_refuse_what_is_not_ct(tmp_path):
    with pytest.raises(ImageReadError, match="field 'Modality'"): hounsfield_units(get_testdata_file('MR_small.dcm'))
    p = write_dicom(tmp_path/'ct_norescale.dcm', np.zeros((4, 4), np.int16), Modality='CT')
    with pytest.raises(ImageReadError, match="field 'RescaleIntercept'"): hounsfield_units(p)

def test_ct_windows_are_the_conventional_ones_and_match_read_dicom():
    assert CT_WINDOWS == {'lung': (-600, 1500), 'mediastinum': (50, 350), 'bone': (500, 2000)}
    hu = hounsfield_units(CT_512)
    for name, w in CT_WINDOWS.items():
        np.testing.assert_allclose(ct_window(hu, name), read_dicom(CT_512, window=w), atol=1e-5)
    np.testing.assert_allclose(ct_window(np.array([-1350., -600., 150.]), 'lung'), [0, .5, 1], atol=1e-3)
    with pytest.raises(ValueError, match="did you mean 'bone'"): ct_window(hu, 'bones')

def test_mammogram_monochrome1_voi_lut_laterality_view(tmp_path):
    p = synthetic_mammogram(tmp_path/'r.dcm', 'R', 'MLO')
    ds = pydicom.dcmread(p)
    assert (ds.PhotometricInterpretation, ds.BitsStored, ds.Modality) == ('MONOCHROME1', 12, 'MG')
    assert 'SYNTHETIC' in ds.ImageComments
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    img = read_dicom(p)
    np.testing.assert_allclose(img, 1 - lut[ds.pixel_array] / 65535, atol=1e-6)   # LUT applied, then inverted
    assert img.min() >= 0 and img.max() <= 1
    assert mammo_view(p) == dict(laterality='R', view='MLO')
    assert mammo_view(synthetic_mammogram(tmp_path/'l.dcm', 'L', 'CC')) == dict(laterality='L', view='CC')

def test_mammo_view_fallbacks_and_refusals(tmp_path):
    px = np.zeros((4, 4), np.uint16)
    item = Dataset(); item.CodeMeaning = 'cranio-caudal'
    p = write_dicom(tmp_path/'a.dcm', px, Modality='MG', Laterality='R', ViewCodeSequence=Sequence([item]))
    assert mammo_view(p) == dict(laterality='R', view='CC')        # series Laterality, coded view
    with pytest.raises(ImageReadError, match="field 'ImageLaterality'"): mammo_view(write_dicom(tmp_path/'b.dcm', px, Modality='MG'))
    with pytest.raises(ImageReadError, match="field 'ImageLaterality'"):
        mammo_view(write_dicom(tmp_path/'c.dcm', px, Modality='MG', ImageLaterality='B'))
    with pytest.raises(ValueError): orient_breast(px, 'B')

def test_presets_and_their_validation():
    assert set(MODALITY_PRESETS) >= {'cxr', 'ct_lung', 'ct_mediastinum', 'mammography'}
    cxr = MODALITY_PRESETS['cxr']
    assert (cxr.window, cxr.normalisation, cxr.hflip, cxr.orient, cxr.image_size) == (None, 'header', Augment().hflip, None, 64)
    assert modality_preset('ct_mediastinum').window == (50, 350) and not modality_preset('mammography').hflip
    with pytest.raises(ConfigError, match=r"my\.yaml: field 'data\.modality': unknown modality preset 'mammo'"):
        modality_preset('mammo', 'my.yaml')
    with pytest.raises(ConfigError, match="field 'window'"): ModalityPreset('x', window=(0, 100))       # header + window
    with pytest.raises(ConfigError, match="field 'hflip'"): ModalityPreset('x', orient='L', hflip=True)

def write_yaml(path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg)); return path

def test_config_modality_field(tmp_path):
    tiny = load_config(CONFIGS/'tiny.yaml')
    assert (tiny.data.modality, tiny.data.image_size) == ('cxr', 32)       # default: nothing existing changes
    raw = yaml.safe_load((CONFIGS/'tiny.yaml').read_text())
    raw['data']['modality'] = 'ct_lungs'
    f = write_yaml(tmp_path/'bad.yaml', raw)
    with pytest.raises(ConfigError, match=r"bad\.yaml: field 'data\.modality': unknown modality preset 'ct_lungs'; did you mean 'ct_lung'"):
        load_config(f)
    with pytest.raises(ConfigError, match="field 'data.modality'"): load_config(CONFIGS/'tiny.yaml', ['data.modality=xray'])
    del raw['data']['image_size']; raw['data']['modality'] = 'ct_mediastinum'
    assert load_config(raw).data.image_size == 256                          # the preset's size when the data section has none
    assert load_config(raw, ['data.image_size=32']).data.image_size == 32   # the config's wins
    raw['model']['autoencoder'] = str(tmp_path)
    with pytest.raises(ConfigError, match="field 'data.modality'.*latent"): load_config(raw, ['data.image_size=32'])

@pytest.fixture(scope='module')
def ct_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('ct')
    slices = {'a': ct_crops(CT_SMALL, root/'images', n=6, crop=.5, seed=0), 'b': ct_crops(CT_512, root/'images', n=2, crop=.5, seed=1)}
    slice_manifest(root, slices, val=['b'])
    return root

def test_ct_crops_keep_hounsfield_units(ct_root):
    hu = hounsfield_units(CT_SMALL)
    crop = hounsfield_units(sorted((ct_root/'images').glob('CT_small_crop*.dcm'))[0])
    assert crop.shape == (64, 64)
    hits = [(y, x) for y in range(65) for x in range(65) if np.array_equal(hu[y:y + 64, x:x + 64], crop)]
    assert len(hits) >= 1                                                   # the exact HU of a window of the original

def test_trainer_builds_the_presets_dataset(ct_root):
    m = load_shared_subset(ct_root)
    cfg = load_config(CONFIGS/'ct_tiny.yaml', [('data.root', str(ct_root))])
    ds = make_dataset(cfg, m, 'train', augment=True)
    assert ds.reader == ModalityReader(MODALITY_PRESETS['ct_lung']) and ds.augment == Augment(hflip=False)
    it = ds[0]
    assert it['image'].shape == (1, 32, 32)
    cxr = make_dataset(load_config(CONFIGS/'tiny.yaml', [('data.root', str(ct_root))]), m, 'train', augment=True)
    assert cxr.reader is read_image and cxr.augment == Augment()            # the 'cxr' default: as before

def test_reader_refuses_files_the_preset_cannot_read(tmp_path):
    png = write_png(tmp_path/'x.png', np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageReadError, match="field 'extension'"): ModalityReader(MODALITY_PRESETS['ct_lung'])(png)
    with pytest.raises(ImageReadError, match="field 'Modality'"):
        ModalityReader(MODALITY_PRESETS['ct_lung'])(synthetic_mammogram(tmp_path/'m.dcm'))
    np.testing.assert_array_equal(ModalityReader(MODALITY_PRESETS['cxr'])(png), read_image(png))

def test_dataset_honours_the_flip_rule(tmp_path):
    "Mammography: right breasts mirrored to lie as left ones, and no random flip ever puts the chest wall on the right."
    files = [synthetic_mammogram(tmp_path/f'{lat}{k}.dcm', lat, 'CC', size=(32, 32), seed=k) for k in range(2) for lat in 'LR']
    slice_manifest(tmp_path, {f'p{k}': [f] for k, f in enumerate(files)}, val=[])
    m = load_shared_subset(tmp_path)
    kw = dict(findings=['nodule'], size=32, split='train', mask_mode=None, cache=False)
    plain = modality_dataset(m, 'mammography', **kw)
    r = [i for i in range(len(plain)) if plain.images['image_id'][i].startswith('R')][0]
    np.testing.assert_allclose(plain.load(r)[0], read_dicom(plain._paths[r])[:, ::-1], atol=2e-3)   # mirrored (float16 cache)
    aug = modality_dataset(m, 'mammography', augment=True, **kw)
    assert aug.augment == Augment(hflip=False)
    for epoch in range(4):
        aug.set_epoch(epoch)
        for i in range(len(aug)):
            im = aug[i]['image'][0]
            assert im[:, :8].mean() > im[:, -8:].mean()                      # chest wall (dense) on the left, always
    flips = modality_dataset(m, ModalityPreset('any_flip', hflip=True), augment=True, **kw)
    assert flips.augment == Augment(hflip=True)

def test_tiny_ct_run_trains_and_samples(ct_root, tmp_path):
    from cxr_diffusion_nbs.sampling import load_generator
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        s = train(CONFIGS/'ct_tiny.yaml', [('data.root', str(ct_root)), ('output.output_dir', str(tmp_path/'run')),
                                           ('optim.max_steps', 2), ('output.progress', False), ('output.sample_every', None)])
    assert s['steps'] == 2 and np.isfinite(s['final_loss'])
    x = load_generator(tmp_path/'run').generate(n=1, seed=0, steps=2)
    assert tuple(x.shape) == (1, 1, 32, 32)
    assert yaml.safe_load((tmp_path/'run'/'config.yaml').read_text())['data']['modality'] == 'ct_lung'
