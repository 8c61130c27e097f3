"Integration tests for cxr_diffusion_nbs.image_io: real DICOMs, synthetic DICOM edge cases, rasters, bad files, resizing."
import warnings
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid
from fastcore.test import test_close as assert_close, test_eq as assert_eq

from cxr_diffusion_nbs.core import CXRDataError, ImageReadError, MaskError, dicom_data_root, sample_data_root
from cxr_diffusion_nbs.image_io import (ResizeTransform, apply_window, dicom_info, read_dicom, read_image,
                                        read_raster, resize_with_masks)

TWIN = '1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm'
MONO1 = 'Fake_MONOHR1.dcm'
DX = '1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm'


# ---------------------------------------------------------------- helpers (independent of the module's write_dicom)
def make_dicom(path, pixels, photometric='MONOCHROME2', bits_stored=None, signed=False, ts=ExplicitVRLittleEndian,
               pixel_bytes=None, **elements):
    "Write a minimal single- or multi-frame DICOM with pydicom only."
    a = np.asarray(pixels)
    alloc = 8 if a.dtype.itemsize == 1 else 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, 'CR'
    ds.Rows, ds.Columns = a.shape[-2:]
    if a.ndim == 3: ds.NumberOfFrames = a.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored = alloc, bits_stored or alloc
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(signed)
    for k, v in elements.items():
        if isinstance(v, DataElement): ds[v.tag] = v
        else: setattr(ds, k, v)
    ds.PixelData = pixel_bytes if pixel_bytes is not None else a.tobytes()
    if pixel_bytes is not None: ds['PixelData'].VR = 'OB'
    ds.save_as(path, enforce_file_format=True)
    return path


def mask_bbox(m):
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


def dicom_linear(x, c, w):
    "DICOM PS3.3 C.11.2.1.2.1 LINEAR window written out independently, output in [0, 1]."
    x = np.asarray(x, dtype=np.float64)
    out = ((x - (c - 0.5)) / (w - 1) + 0.5)
    out[x <= c - 0.5 - (w - 1) / 2] = 0
    out[x > c - 0.5 + (w - 1) / 2] = 1
    return out


RAMP16 = np.linspace(0, 65535, 32 * 48).astype(np.uint16).reshape(32, 48)
RAMP12 = np.linspace(0, 4095, 32 * 48).astype(np.uint16).reshape(32, 48)


# ---------------------------------------------------------------- real DICOMs
@pytest.mark.parametrize('name', [TWIN, MONO1, DX])
def test_real_dicoms_load(name):
    a = read_image(dicom_data_root()/name)
    assert_eq((a.shape, a.dtype), ((1024, 1024), np.float32))
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.1


def test_monochrome1_is_negative_of_twin():
    fake, twin = read_dicom(dicom_data_root()/MONO1), read_dicom(dicom_data_root()/TWIN)
    assert_close(fake, 1 - twin, eps=1e-5)
    assert np.abs(fake - twin).mean() > 0.2          # and the two are really different images


def test_real_dicom_matches_stored_values_and_brightness_convention():
    raw = pydicom.dcmread(dicom_data_root()/DX).pixel_array
    a = read_dicom(dicom_data_root()/DX)
    assert_close(a, raw / 255.0, eps=1e-6)             # 8-bit, no rescale, no window, MONOCHROME2
    # display convention: the mediastinum (centre column) is brighter than the lungs (left/right thirds)
    h, w = a.shape
    assert a[h//3:2*h//3, 7*w//16:9*w//16].mean() > a[h//3:2*h//3, w//6:w//3].mean()


def test_dicom_info_real():
    info = dicom_info(dicom_data_root()/MONO1)
    assert_eq((info['photometric'], info['rows'], info['columns'], info['bits_stored'], info['frames']),
            ('MONOCHROME1', 1024, 1024, 8, 1))
    assert_eq(info['transfer_syntax'], '1.2.840.10008.1.2.4.50')
    assert info['decodable'] is True
    assert not any('patient' in k.lower() for k in info)


def test_extensionless_dicom(tmp_path):
    p = tmp_path/'IM0001'
    p.write_bytes((dicom_data_root()/TWIN).read_bytes())
    assert np.array_equal(read_image(p), read_dicom(dicom_data_root()/TWIN))


# ---------------------------------------------------------------- synthetic DICOMs
def test_16bit_rescale_slope_intercept(tmp_path):
    p = make_dicom(tmp_path/'r.dcm', RAMP16, RescaleSlope=2, RescaleIntercept=-1000)
    assert_close(read_dicom(p), RAMP16 / 65535, eps=1e-6)          # full stored range mapped through the rescale
    hu = RAMP16.astype(np.float64) * 2 - 1000
    assert_close(read_dicom(p, window=(30000, 20000)), dicom_linear(hu, 30000, 20000), eps=1e-5)  # window in rescaled units
    p2 = make_dicom(tmp_path/'r2.dcm', RAMP16, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=60000, WindowWidth=40001)
    assert_close(read_dicom(p2), dicom_linear(hu, 60000, 40001), eps=1e-5)
    assert read_dicom(p2).min() == 0 and read_dicom(p2).max() == 1


def test_12bit_with_window(tmp_path):
    p = make_dicom(tmp_path/'w.dcm', RAMP12, bits_stored=12, WindowCenter=2000, WindowWidth=1000)
    out = read_dicom(p)
    assert_close(out, dicom_linear(RAMP12, 2000, 1000), eps=1e-6)
    assert_close(read_dicom(p, apply_voi=False), RAMP12 / 4095, eps=1e-6)    # 12 bits: /4095, not /65535
    assert_close(read_dicom(p, window=(1000, 500)), dicom_linear(RAMP12, 1000, 500), eps=1e-6)   # explicit wins
    assert np.array_equal(read_image(p), out)


def test_monochrome1_16bit(tmp_path):
    p = make_dicom(tmp_path/'m1.dcm', RAMP16, photometric='MONOCHROME1')
    assert_close(read_dicom(p), 1 - RAMP16 / 65535, eps=1e-6)
    pw = make_dicom(tmp_path/'m1w.dcm', RAMP16, photometric='MONOCHROME1', WindowCenter=20000, WindowWidth=10000)
    assert_close(read_dicom(pw), 1 - dicom_linear(RAMP16, 20000, 10000), eps=1e-6)


def test_signed_pixels(tmp_path):
    a = np.linspace(-2048, 2047, 32 * 48).astype(np.int16).reshape(32, 48)
    p = make_dicom(tmp_path/'s.dcm', a, bits_stored=12, signed=True)
    assert_close(read_dicom(p), (a + 2048) / 4095, eps=1e-6)


def test_voi_lut_sequence(tmp_path):
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)   # nonlinear vendor-style curve
    item = Dataset()
    item['LUTDescriptor'] = DataElement(0x00283002, 'US', [4096, 0, 16])
    item['LUTData'] = DataElement(0x00283006, 'US', lut.tolist())
    seq = DataElement(0x00283010, 'SQ', [item])
    p = make_dicom(tmp_path/'lut.dcm', RAMP12, bits_stored=12, VOILUTSequence=seq,
                   WindowCenter=100, WindowWidth=10)           # the LUT takes precedence over the window
    assert_close(read_dicom(p), lut[RAMP12] / 65535, eps=1e-6)
    assert dicom_info(p)['n_voi_luts'] == 1


def test_multiframe(tmp_path):
    frames = np.stack([RAMP12, 4095 - RAMP12])
    p = make_dicom(tmp_path/'mf.dcm', frames, bits_stored=12)
    with pytest.raises(ImageReadError, match="mf.dcm: field 'NumberOfFrames'"): read_dicom(p)
    assert_close(read_dicom(p, frame=1), (4095 - RAMP12) / 4095, eps=1e-6)
    with pytest.raises(ImageReadError, match='NumberOfFrames'): read_dicom(p, frame=2)


# ---------------------------------------------------------------- rasters
def test_png_8_16_bit_and_rgb(tmp_path):
    g8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g8).save(tmp_path/'g8.png')
    assert_close(read_image(tmp_path/'g8.png'), g8 / 255, eps=1e-6)
    g16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(g16).save(tmp_path/'g16.png')
    assert_close(read_image(tmp_path/'g16.png'), g16 / 65535, eps=1e-6)
    g12 = (np.arange(256, dtype=np.uint16) * 16).reshape(16, 16)        # 12-bit data in a 16-bit PNG: /65535, not /max
    Image.fromarray(g12).save(tmp_path/'g12.png')
    assert_close(read_image(tmp_path/'g12.png'), g12 / 65535, eps=1e-6)
    rgb = np.zeros((4, 4, 3), np.uint8); rgb[..., 0] = 200; rgb[..., 1] = 100; rgb[..., 2] = 50
    Image.fromarray(rgb).save(tmp_path/'rgb.png')
    assert_close(read_image(tmp_path/'rgb.png'), np.full((4, 4), (0.299*200 + 0.587*100 + 0.114*50) / 255), eps=1e-5)
    Image.fromarray(np.dstack([g8, np.full_like(g8, 7)]), 'LA').save(tmp_path/'la.png')
    assert_close(read_image(tmp_path/'la.png'), g8 / 255, eps=1e-6)           # alpha dropped
    Image.fromarray(np.dstack([g8, g8, g8, np.full_like(g8, 0)])).save(tmp_path/'rgba.png')
    assert_close(read_image(tmp_path/'rgba.png'), g8 / 255, eps=1e-5)
    Image.fromarray(g8).convert('P').save(tmp_path/'pal.png')
    assert_close(read_image(tmp_path/'pal.png'), g8 / 255, eps=1e-5)


def test_jpeg_and_window(tmp_path):
    g8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    Image.fromarray(g8).save(tmp_path/'g.jpg', quality=95)
    assert_close(read_image(tmp_path/'g.jpg'), g8 / 255, eps=0.03)
    Image.fromarray(g8).save(tmp_path/'g.png')
    assert_close(read_raster(tmp_path/'g.png', window=(128, 64)), dicom_linear(g8, 128, 64), eps=1e-6)


def test_real_sample_png():
    a = read_image(sample_data_root()/'images'/'nih_00000032_037.png')
    assert_eq((a.shape, a.dtype), ((256, 256), np.float32))
    assert 0 <= a.min() < a.max() <= 1


# ---------------------------------------------------------------- bad input
def test_truncated_dicoms(tmp_path):
    data = (dicom_data_root()/TWIN).read_bytes()                  # JPEG-compressed
    (tmp_path/'trunc_jpeg.dcm').write_bytes(data[:len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ImageReadError, match="trunc_jpeg.dcm: field 'PixelData'"): read_image(tmp_path/'trunc_jpeg.dcm')
    data = (dicom_data_root()/DX).read_bytes()                    # uncompressed
    (tmp_path/'trunc_raw.dcm').write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageReadError, match="trunc_raw.dcm: field 'PixelData'"): read_image(tmp_path/'trunc_raw.dcm')
    (tmp_path/'tiny.dcm').write_bytes(data[:60])
    with pytest.raises(ImageReadError, match="tiny.dcm: field 'file'"): read_image(tmp_path/'tiny.dcm')


def test_corrupt_dicom(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path/'noise.dcm').write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="noise.dcm: field 'file'"): read_image(tmp_path/'noise.dcm')
    # JPEG stream destroyed inside a valid header
    data = bytearray((dicom_data_root()/TWIN).read_bytes())
    start = data.find(b'\xff\xd8\xff')
    data[start:start + 4000] = b'\x00' * 4000
    (tmp_path/'badjpeg.dcm').write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ImageReadError, match="badjpeg.dcm: field 'PixelData'"): read_image(tmp_path/'badjpeg.dcm')


def test_undecodable_transfer_syntax(tmp_path):
    p = make_dicom(tmp_path/'jls.dcm', RAMP12, bits_stored=12, ts=JPEGLSLossless,
                   pixel_bytes=encapsulate([b'\xff\xd8\xff\xf7' + b'\x00' * 64]))
    with pytest.raises(ImageReadError, match="jls.dcm: field 'TransferSyntaxUID'"): read_image(p)


def test_missing_pixel_data(tmp_path):
    p = make_dicom(tmp_path/'hdr.dcm', RAMP12, bits_stored=12)
    ds = pydicom.dcmread(p); del ds.PixelData; ds.save_as(p)
    with pytest.raises(ImageReadError, match="hdr.dcm: field 'PixelData'"): read_image(p)


def test_bad_rasters(tmp_path):
    data = (sample_data_root()/'images'/'nih_00000032_037.png').read_bytes()
    (tmp_path/'cut.png').write_bytes(data[:len(data) // 3])
    with pytest.raises(ImageReadError, match="cut.png: field 'pixels'"): read_image(tmp_path/'cut.png')
    (tmp_path/'junk.png').write_bytes(b'this is not a png')
    with pytest.raises(ImageReadError, match="junk.png: field 'file'"): read_image(tmp_path/'junk.png')
    (tmp_path/'x.bmpx').write_bytes(data)
    with pytest.raises(ImageReadError, match="x.bmpx: field 'extension'"): read_image(tmp_path/'x.bmpx')
    with pytest.raises(ImageReadError, match="missing.png: field 'file'"): read_image(tmp_path/'missing.png')
    assert issubclass(ImageReadError, CXRDataError)


# ---------------------------------------------------------------- resizing with masks
def test_mask_shape_mismatch():
    img = np.zeros((100, 80), np.float32)
    with pytest.raises(MaskError, match="a.png: field 'shape'"):
        resize_with_masks(img, np.zeros((1, 100, 81)), 64, source='a.png')
    with pytest.raises(MaskError, match="field 'shape'"):
        resize_with_masks(img, np.zeros((80, 100)), 64)


@pytest.mark.parametrize('mode', ['pad', 'crop', 'stretch'])
@pytest.mark.parametrize('in_hw,out', [((300, 200), (64, 96)), ((256, 256), 64), ((120, 333), (100, 50))])
def test_resize_keeps_box_mask_aligned(mode, in_hw, out):
    rng = np.random.default_rng(hash((mode, in_hw)) % 2**32)
    img = rng.random(in_hw).astype(np.float32)
    H, W = in_hw
    for _ in range(5):
        x0, x1 = sorted(rng.choice(np.arange(W // 4, 3 * W // 4), 2, replace=False))
        y0, y1 = sorted(rng.choice(np.arange(H // 4, 3 * H // 4), 2, replace=False))
        if x1 - x0 < 12 or y1 - y0 < 12: continue
        m = np.zeros((1, H, W), np.float32); m[0, y0:y1, x0:x1] = 1
        o, mo, tf = resize_with_masks(img, m, out, mode=mode)
        oh, ow = (out, out) if np.isscalar(out) else out
        assert_eq((o.shape, mo.shape, mo.dtype), ((oh, ow), (1, oh, ow), np.float32))
        assert set(np.unique(mo)) <= {0.0, 1.0}
        mapped = tf.apply_box([x0, y0, x1, y1], clip=True)
        if min(mapped[2] - mapped[0], mapped[3] - mapped[1]) <= 0:     # cropped away entirely
            assert mo.sum() == 0; continue
        if min(mapped[2] - mapped[0], mapped[3] - mapped[1]) < 1: continue   # sub-pixel remnant: keep_small's case
        assert np.abs(mask_bbox(mo[0]) - mapped).max() <= 0.5 + 1e-6, (mode, mapped, mask_bbox(mo[0]))


def test_resize_real_box_mask():
    root = sample_data_root()
    boxes = pd.read_csv(root/'boxes.csv')
    single = boxes.groupby('image_id').filter(lambda g: len(g) == 1)
    row = single.iloc[0]
    img = read_image(root/'images'/f'{row.image_id}.png')
    mask = read_image(root/'masks'/f'{row.image_id}_bbox.png') > 0.5
    box = row[['x_min', 'y_min', 'x_max', 'y_max']].to_numpy(float)
    assert np.abs(mask_bbox(mask) - box).max() <= 1.0             # the stored mask is the stored box
    for mode in ('pad', 'crop', 'stretch'):
        o, mo, tf = resize_with_masks(img, mask, (64, 80), mode=mode, source=row.image_id)
        assert_eq((mo.shape, mo.dtype), ((64, 80), bool))
        assert np.abs(mask_bbox(mo) - tf.apply_box(box, clip=True)).max() <= 1.0


def test_resize_modes_geometry_and_values():
    img = np.ones((200, 100), np.float32)
    o, _, tf = resize_with_masks(img, None, 50, mode='pad')
    assert_eq((tf.scale_x, tf.scale_y, tf.offset_x, tf.offset_y, tf.out_size), (0.25, 0.25, 12.0, 0.0, (50, 50)))
    assert o[:, :12].max() == 0 and o[:, 12:37].min() > 0.99      # letterbox: black bars, content intact
    o, _, tf = resize_with_masks(img, None, 50, mode='crop')
    assert_eq((tf.scale_x, tf.offset_y), (0.5, -25.0)); assert o.min() > 0.99
    o, _, tf = resize_with_masks(img, None, (40, 30), mode='stretch')
    assert_eq((tf.scale_x, tf.scale_y, o.shape), (0.3, 0.2, (40, 30)))
    back = tf.inverse()
    assert_close(back.apply_points(tf.apply_points([[10, 20], [99, 199]])), [[10, 20], [99, 199]], eps=1e-9)
    x = np.random.default_rng(1).random((256, 256)).astype(np.float32)
    o, _, _ = resize_with_masks(x, None, 64, mode='stretch')
    assert 0 <= o.min() and o.max() <= 1
    assert_close(o.mean(), x.mean(), eps=0.01)                       # anti-aliased: the mean is preserved
    assert o.std() < x.std() / 2                                   # and pixel noise averaged, not sampled


def test_keep_small_lesion():
    img = np.zeros((512, 512), np.float32)
    m = np.zeros((2, 512, 512), np.uint8); m[0, 200:203, 300:303] = 1; m[1, 10:200, 10:200] = 1
    _, mo, tf = resize_with_masks(img, m, 32)
    assert mo[0].sum() >= 1 and mo.dtype == np.uint8
    cy, cx = np.argwhere(mo[0])[0]
    px, py = tf.apply_points([301.5, 201.5])
    assert abs(cx + 0.5 - px) <= 1 and abs(cy + 0.5 - py) <= 1    # kept where it was
    _, mo2, _ = resize_with_masks(img, m, 32, keep_small=False)
    assert_eq(mo2[0].sum(), 0)
    assert_eq(mo2[1], mo[1])


def test_resize_transform_box_clip():
    tf = ResizeTransform(0.5, 0.5, -10.0, 5.0, (40, 40))
    assert_close(tf.apply_box([0, 0, 100, 100]), [-10, 5, 40, 55], eps=1e-9)
    assert_close(tf.apply_box([[0, 0, 100, 100]], clip=True), [[0, 5, 40, 40]], eps=1e-9)


def test_apply_window():
    assert_close(apply_window([0, 100.0, 200], 100.5, 101), [0, 0.5, 1], eps=1e-6)
    with pytest.raises(ValueError): apply_window([1], 0, 0.5)

# --- writing 8-bit PNGs (moved here from sampling) ---------------------------------------------------------------
def test_to_uint8_and_write_png_round_trip(tmp_path):
    import torch
    from cxr_diffusion_nbs.image_io import to_uint8, write_png
    x = torch.linspace(-1.5, 1.5, 64).reshape(8, 8)
    px = to_uint8(x)
    assert px.dtype == np.uint8 and px.min() == 0 and px.max() == 255
    assert np.array_equal(px, to_uint8(x.numpy()))                     # tensor or array, same grey levels
    assert np.array_equal(px, ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
    f = write_png(tmp_path/'a.png', px, {'Description': 'SYNTHETIC test', 'Provenance': '{"seed": 1}'})
    im = Image.open(f)
    assert im.mode == 'L' and im.text['Description'] == 'SYNTHETIC test' and im.text['Provenance'] == '{"seed": 1}'
    assert np.array_equal(np.asarray(im), px) and not list(tmp_path.glob('.*'))      # atomic: no temporary file left
    with pytest.raises(CXRDataError, match="'pixels'"): write_png(tmp_path/'b.png', x.numpy())


# --- issue 12: non-finite pixels, decompression bombs, non-image DICOM objects --------------------------------------
def png_header_only(path, w, h):
    "A PNG whose IHDR claims w x h 8-bit grey pixels, with a token IDAT: a decompression bomb's header, ~60 bytes."
    import struct, zlib
    def chunk(kind, data): return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))
    return path


@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
def test_float_tiff_with_non_finite_pixels_is_refused(tmp_path, value):
    a = np.full((8, 8), 0.5, np.float32); a[2, 3] = value
    Image.fromarray(a).save(tmp_path/'f.tif')
    with pytest.raises(ImageReadError, match=r"f.tif: field 'pixels': 1 of 64 pixel values are not finite"):
        read_image(tmp_path/'f.tif')
    a[2, 3] = 0.25
    Image.fromarray(a).save(tmp_path/'ok.tif')
    assert_close(read_image(tmp_path/'ok.tif')[2, 3], 0.25, eps=1e-6)


def test_dicom_float_pixel_data_nan_is_refused(tmp_path):
    ds = pydicom.dcmread(make_dicom(tmp_path/'f.dcm', np.zeros((4, 4), np.uint16)))
    del ds.PixelData, ds.PixelRepresentation
    ds.BitsAllocated = ds.BitsStored = 32; ds.HighBit = 31
    a = np.full((4, 4), 0.5, np.float32); a[1, 1] = np.nan
    ds.FloatPixelData = a.tobytes()
    ds.save_as(tmp_path/'f.dcm')
    with pytest.raises(ImageReadError, match=r"f.dcm: field 'FloatPixelData': 1 of 16 pixel values are not finite"):
        read_image(tmp_path/'f.dcm')


def test_dicom_rescale_slope_overflow_is_refused(tmp_path):
    p = make_dicom(tmp_path/'s.dcm', RAMP16[:, :8], RescaleSlope='1e308', RescaleIntercept=0)
    with pytest.raises(ImageReadError, match=r"s.dcm: field 'RescaleSlope': .* not finite"), warnings.catch_warnings():
        warnings.simplefilter('error')                 # and no numpy overflow warning on the way
        read_dicom(p)


def test_png_decompression_bomb_refused_before_decoding(tmp_path):
    import tracemalloc
    p = png_header_only(tmp_path/'bomb.png', 9500, 9500)
    assert p.stat().st_size < 200
    tracemalloc.start()
    with pytest.raises(ImageReadError, match=r"bomb.png: field 'size': 9500 x 9500 = 90,250,000 pixels .*image_io.MAX_IMAGE_PIXELS"), \
         warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        read_image(p)
    assert tracemalloc.get_traced_memory()[1] < 50e6     # refused from the header: nothing near 90 MB was allocated
    tracemalloc.stop()


def test_size_limit_applies_to_jpeg_tiff_dicom_and_can_be_raised(tmp_path, monkeypatch):
    from cxr_diffusion_nbs import image_io
    g = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 256
    Image.fromarray(g.astype(np.uint8)).save(tmp_path/'g.jpg')
    Image.fromarray(g.astype(np.uint8)).save(tmp_path/'g.tif')
    d = make_dicom(tmp_path/'g.dcm', np.stack([g, g]), bits_stored=12)     # 2 frames
    monkeypatch.setattr(image_io, 'MAX_IMAGE_PIXELS', 3000)
    for f in ('g.jpg', 'g.tif'):
        with pytest.raises(ImageReadError, match=rf"{f}: field 'size': 48 x 64 = 3,072 pixels is more than the limit of 3,000"):
            read_image(tmp_path/f)
    with pytest.raises(ImageReadError, match=r"g.dcm: field 'Rows': Rows x Columns x frames = 64 x 48 x 2 = 6,144 pixels"):
        read_image(d, frame=0)
    monkeypatch.setattr(image_io, 'MAX_IMAGE_PIXELS', 6144)
    for f in ('g.jpg', 'g.tif'): assert read_image(tmp_path/f).shape == (64, 48)
    assert read_image(d, frame=1).shape == (64, 48)


def test_dicom_bomb_refused_from_the_header(tmp_path):
    p = make_dicom(tmp_path/'big.dcm', np.zeros((4, 4), np.uint16), pixel_bytes=b'\0' * 32, Rows=30000, Columns=30000)
    with pytest.raises(ImageReadError, match=r"big.dcm: field 'Rows': Rows x Columns x frames = 30000 x 30000 x 1"):
        read_image(p)


def non_image_dicom(path, sop_class, **elements):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, 'RTSTRUCT'
    for k, v in elements.items(): setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_non_image_sop_classes_are_refused_by_name(tmp_path):
    from pydicom.uid import BasicTextSRStorage, RTStructureSetStorage, SegmentationStorage
    rt = non_image_dicom(tmp_path/'rt.dcm', RTStructureSetStorage)
    with pytest.raises(ImageReadError, match=r"rt.dcm: field 'SOPClassUID': SOP Class 'RT Structure Set Storage' "
                                             r"\(1.2.840.10008.5.1.4.1.1.481.3\) is not an image"):
        read_image(rt)
    sr = non_image_dicom(tmp_path/'sr', BasicTextSRStorage)                # extension-less, found by its preamble
    with pytest.raises(ImageReadError, match=r"sr: field 'SOPClassUID': SOP Class 'Basic Text SR Storage'"): read_image(sr)
    # a segmentation carries pixel data, yet it is not a radiograph
    seg = make_dicom(tmp_path/'seg.dcm', np.zeros((4, 4), np.uint8), SOPClassUID=SegmentationStorage)
    with pytest.raises(ImageReadError, match=r"seg.dcm: field 'SOPClassUID': SOP Class 'Segmentation Storage'"): read_image(seg)
    # an image SOP class without pixel data: named too
    hdr = non_image_dicom(tmp_path/'hdr.dcm', SecondaryCaptureImageStorage)
    with pytest.raises(ImageReadError, match=r"hdr.dcm: field 'PixelData': missing .*SOP Class 'Secondary Capture Image "
                                             r"Storage' \(1.2.840.10008.5.1.4.1.1.7\) without pixels is not an image"):
        read_image(hdr)


def test_pillow_hard_limit_is_reported_with_both_settings(tmp_path, monkeypatch):
    from cxr_diffusion_nbs import image_io
    Image.fromarray(np.zeros((64, 48), np.uint8)).save(tmp_path/'g.png')
    monkeypatch.setattr(image_io, 'MAX_IMAGE_PIXELS', 10**9)             # ours raised, Pillow's own stop still there
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)                 # 3072 > 2 x 1000: DecompressionBombError
    with pytest.raises(ImageReadError, match=r"g.png: field 'size': .*PIL.Image.MAX_IMAGE_PIXELS as well as "
                                             r"cxr_diffusion_nbs.image_io.MAX_IMAGE_PIXELS"):
        read_image(tmp_path/'g.png')

def test_size_limit_from_the_environment_is_checked():
    "CXR_MAX_IMAGE_PIXELS sets the limit's starting value; a malformed one is refused by name, not with a bare int() error."
    import subprocess, sys, os
    run = lambda v: subprocess.run([sys.executable, '-c', 'import cxr_diffusion_nbs.image_io as m; print(m.MAX_IMAGE_PIXELS)'],
                                   capture_output=True, text=True, env=dict(os.environ, CXR_MAX_IMAGE_PIXELS=v))
    assert run('80_000_000').stdout.strip() == '80000000'
    for bad in ('abc', '-5', '1e8'):
        r = run(bad)
        assert r.returncode != 0 and f"CXR_MAX_IMAGE_PIXELS: field 'environment': {bad!r} is not a positive whole number" in r.stderr, r.stderr[-500:]
