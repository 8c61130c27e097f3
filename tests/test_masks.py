"Tests for cxr_diffusion_nbs.masks: rasterisation, SIIM-ACR RLE, frame scaling, stacking and error messages."
import json, math, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_diffusion_nbs.core import MaskError, sample_data_root
from cxr_diffusion_nbs.masks import (box_to_mask, polygon_to_mask, rle_decode, rle_encode, render_annotation,
                                     lesion_masks, mask_bbox, mask_centroid, mask_area_fraction)

# 4x4 mask, worked out by hand (column-major pixel numbers in brackets):
#   col 1 rows 0-1 -> pixels 4, 5 ; col 3 rows 2-3 -> pixels 14, 15
M4 = np.array([[0, 1, 0, 0],
               [0, 1, 0, 0],
               [0, 0, 0, 1],
               [0, 0, 0, 1]], bool)


# ---------------------------------------------------------------- independent reference implementations
def siim_rle2mask(rle, width, height):
    "Loop version of the SIIM-ACR sample decoder: relative starts, result transposed (column-major)."
    mask = np.zeros(width * height, bool)
    if rle.strip() == '-1': return mask.reshape(height, width)
    vals = [int(v) for v in rle.split()]
    pos = 0
    for start, length in zip(vals[0::2], vals[1::2]):
        pos += start
        mask[pos:pos + length] = True
        pos += length
    return mask.reshape(width, height).T


def siim_mask2rle(mask):
    "Loop version of the SIIM-ACR sample encoder (on the transposed image), plus the final run it omits."
    img = mask.T
    width, height = img.shape
    rle, last, cur, run_start, run_len = [], 0, 0, -1, 0
    for x in range(width):
        for y in range(height):
            c = int(img[x][y])
            if c != last:
                if c == 1: run_start, run_len = cur, 1
                else:
                    rle += [run_start, run_len]; run_start, run_len, cur = -1, 0, 0
            elif run_start > -1: run_len += 1
            last = c; cur += 1
    if run_start > -1: rle += [run_start, run_len]
    return ' '.join(map(str, rle)) if rle else '-1'


def random_masks(n=30, seed=0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = rng.integers(1, 20, size=2)
        yield rng.random((h, w)) < rng.choice([0.05, 0.3, 0.7, 0.97])


# ---------------------------------------------------------------- RLE
def test_rle_hand_made_4x4():
    assert rle_encode(M4) == '4 2 8 2'
    assert (rle_decode('4 2 8 2', (4, 4)) == M4).all()
    assert rle_encode(M4, relative=False) == '5 2 15 2'
    assert (rle_decode('5 2 15 2', (4, 4), relative=False) == M4).all()
    assert rle_encode(M4, relative=False, one_based=False) == '4 2 14 2'
    assert (rle_decode('4 2 14 2', (4, 4), relative=False, one_based=False) == M4).all()
    # row-major (Carvana-style) numbering: pixels 1, 5, 11, 15 (0-based)
    assert rle_encode(M4, relative=False, order='C') == '2 1 6 1 12 1 16 1'
    assert (rle_decode('2 1 6 1 12 1 16 1', (4, 4), relative=False, order='C') == M4).all()
    assert rle_encode(M4, order='C') == '1 1 3 1 5 1 3 1'


def test_rle_edges_and_empty():
    last = np.zeros((4, 4), bool); last[3, 3] = True
    assert rle_encode(last) == '15 1'                      # run that ends on the last pixel is written
    assert rle_encode(np.ones((2, 2))) == '0 4'
    assert rle_encode(np.full((2, 3), 255, np.uint8)) == '0 6'
    first = np.zeros((3, 2), bool); first[0, 0] = first[1, 0] = True
    assert rle_encode(first) == '0 2'
    assert rle_encode(np.zeros((4, 4))) == '-1'
    assert rle_encode(np.zeros((4, 4)), relative=False) == ''
    for empty in ('-1', ' -1', '', '  ', None, float('nan')):
        m = rle_decode(empty, (3, 5))
        assert m.shape == (3, 5) and not m.any()
    # adjacent runs (gap 0) are legal in the relative form
    assert (rle_decode('4 1 0 1 8 2', (4, 4)) == M4).all()


def test_rle_matches_siim_reference_non_square():
    for m in random_masks():
        h, w = m.shape
        code = rle_encode(m)
        assert code == siim_mask2rle(m)
        assert (siim_rle2mask(code, w, h) == m).all()
        assert (rle_decode(code, (h, w)) == m).all()


@pytest.mark.parametrize('relative,one_based,order', [(True, None, 'F'), (False, None, 'F'), (False, False, 'F'),
                                                      (False, None, 'C'), (True, True, 'C')])
def test_rle_round_trip_random(relative, one_based, order):
    for m in random_masks(seed=1):
        code = rle_encode(m, relative=relative, one_based=one_based, order=order)
        back = rle_decode(code, m.shape, relative=relative, one_based=one_based, order=order)
        assert back.dtype == bool and (back == m).all()


def test_rle_1024_round_trip_and_transpose_matters():
    m = np.zeros((1024, 1024), bool); m[100:300, 700:720] = True    # vertical strip, right upper zone
    code = rle_encode(m)
    assert (rle_decode(code, (1024, 1024)) == m).all()
    assert not (rle_decode(code, (1024, 1024), order='C') == m).all()


def test_rle_absolute_overlapping_runs_union():
    m = rle_decode('1 3 2 3', (3, 3), relative=False)          # pixels 0-2 and 1-3 -> 0-3
    assert m.ravel(order='F').tolist() == [True] * 4 + [False] * 5


@pytest.mark.parametrize('rle,problem', [('4 2 8', 'odd number'), ('4 2.5', 'not an integer'), ('4 two', "'two'"),
                                         ('4 2 8 5', 'past the 4x4 image'), ('17 1', 'past the 4x4 image'),
                                         ('4 0', 'length 0'), ('-3 2', 'negative')])
def test_rle_malformed(rle, problem):
    with pytest.raises(MaskError, match=problem) as e:
        rle_decode(rle, (4, 4), source='train-rle.csv')
    assert e.value.field == 'rle' and e.value.path == 'train-rle.csv'
    assert str(e.value).startswith("train-rle.csv: field 'rle'")


def test_rle_absolute_malformed():
    with pytest.raises(MaskError, match='before the first pixel'): rle_decode('0 2', (4, 4), relative=False)
    with pytest.raises(MaskError, match='past the'): rle_decode('16 2', (4, 4), relative=False)
    assert rle_decode('16 1', (4, 4), relative=False)[3, 3]


# ---------------------------------------------------------------- boxes and polygons
def test_box_areas():
    assert box_to_mask((2, 1, 5, 3), (4, 6)).sum() == 6
    assert box_to_mask((0, 0, 6, 4), (4, 6)).all()
    m = box_to_mask((10, 20, 30, 60), (64, 64))
    assert m.sum() == 20 * 40 and m[20:60, 10:30].all()
    assert box_to_mask((1.2, 1.2, 2.8, 2.8), (8, 8)).sum() == 4       # overlaps 2x2 pixels
    assert box_to_mask((1.0, 1.0, 3.0, 3.0 + 1e-9), (8, 8)).sum() == 4  # float noise adds nothing
    assert box_to_mask((-5, -5, 2, 2), (8, 8)).sum() == 4               # clipped
    assert box_to_mask((20, 20, 30, 30), (8, 8)).sum() == 0             # outside
    assert box_to_mask((3, 3, 3, 6), (8, 8)).sum() == 0                 # zero width
    assert box_to_mask((3.4, 3.4, 3.6, 3.6), (8, 8)).sum() == 1         # sub-pixel box keeps a pixel


def test_box_errors():
    for bad in [(5, 0, 2, 3), (0, 0, float('nan'), 1), (0, 0, 1), 'abc']:
        with pytest.raises(MaskError) as e: box_to_mask(bad, (8, 8), source='boxes.csv')
        assert e.value.field == 'box' and 'boxes.csv' in str(e.value)


def test_polygon_areas():
    assert polygon_to_mask([[2, 2], [5, 2], [5, 5], [2, 5]], (8, 8)).sum() == 9
    assert (polygon_to_mask([[2, 2], [5, 2], [5, 5], [2, 5]], (8, 8)) == box_to_mask((2, 2, 5, 5), (8, 8))).all()
    assert polygon_to_mask('[[0, 0], [8, 0], [0, 4]]', (8, 8)).sum() == 16     # x + 2y < 8 at pixel centres
    big = polygon_to_mask([[0, 0], [100, 0], [100, 50], [0, 50]], (128, 128))
    assert big.sum() == 5000 and big[:50, :100].all()
    assert polygon_to_mask([[3.1, 3.1], [3.3, 3.1], [3.2, 3.3]], (8, 8)).sum() == 1
    assert polygon_to_mask([[-10, -10], [20, -10], [20, 20], [-10, 20]], (8, 8)).all()


@pytest.mark.parametrize('points', ['[[0, 0], [1, 1]]', '[[0, 0], [1, 1', '[[0, 0, 1], [1, 1, 1], [2, 2, 2]]',
                                    [[0, 0], [1, 'a'], [2, 2]], [[0, 0], [1, float('inf')], [2, 2]]])
def test_polygon_errors(points):
    with pytest.raises(MaskError) as e: polygon_to_mask(points, (8, 8), source='chestx_det.json')
    assert e.value.field == 'points' and e.value.path == 'chestx_det.json'


# ---------------------------------------------------------------- render_annotation
def row(**kw):
    base = dict(image_id='img1', finding='nodule', kind='box', x_min=np.nan, y_min=np.nan, x_max=np.nan,
                y_max=np.nan, points='', rle='', mask_path='', frame_width=np.nan, frame_height=np.nan, source='test')
    base.update(kw); return base


def test_render_box_scaled_1024_to_256():
    r = row(x_min=100, y_min=200, x_max=500, y_max=600, frame_width=1024, frame_height=1024)
    m = render_annotation(r, (256, 256))
    assert m.dtype == bool and m.shape == (256, 256)
    assert m.sum() == 100 * 100 and m[50:150, 25:125].all()
    assert (render_annotation(pd.Series(r), (256, 256)) == m).all()              # a DataFrame row works too
    # NaN frame: coordinates already in the target shape
    assert render_annotation(row(x_min=25, y_min=50, x_max=125, y_max=150), (256, 256)).sum() == 100 * 100
    # non-square frame scales x and y separately
    m2 = render_annotation(row(x_min=0, y_min=0, x_max=1000, y_max=500, frame_width=2000, frame_height=1000), (100, 200))
    assert m2.sum() == 100 * 50 and m2[:50, :100].all()


def test_render_polygon_scaled():
    pts = json.dumps([[100, 100], [500, 100], [500, 300], [100, 300]])
    m = render_annotation(row(kind='polygon', points=pts, frame_width=1024, frame_height=1024), (256, 256))
    assert m.sum() == 100 * 50 and m[25:75, 25:125].all()


def test_render_rle_frame_and_format():
    m1024 = np.zeros((1024, 1024), bool); m1024[400:480, 120:200] = True
    r = row(kind='rle', rle=rle_encode(m1024), frame_width=1024, frame_height=1024)
    m = render_annotation(r, (256, 256))
    assert m.sum() == 20 * 20 and m[100:120, 30:50].all()
    ra = row(kind='rle', rle=rle_encode(m1024, relative=False), rle_format='absolute', frame_width=1024, frame_height=1024)
    assert (render_annotation(ra, (256, 256)) == m).all()
    with pytest.raises(MaskError) as e: render_annotation({**r, 'rle': '5 5 5'}, (256, 256))
    assert e.value.field == 'rle' and 'img1' in e.value.path


def test_render_mask_png(tmp_path):
    arr = np.zeros((512, 512), np.uint8); arr[100:200, 300:400] = 255
    p = tmp_path/'m.png'; Image.fromarray(arr).save(p)
    r = row(kind='mask', mask_path=str(p), frame_width=1024, frame_height=1024)
    m = render_annotation(r, (256, 256))
    assert m.sum() == 50 * 50 and m[50:100, 150:200].all()
    # frame NaN: the PNG only has to have the aspect of the target shape
    assert render_annotation(row(kind='mask', mask_path=str(p)), (128, 128)).sum() == 25 * 25
    # 0/1 PNG and RGB PNG are read too
    Image.fromarray((arr > 0).astype(np.uint8)).save(tmp_path/'m01.png')
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path/'rgb.png')
    for name in ('m01.png', 'rgb.png'):
        assert (render_annotation(row(kind='mask', mask_path=str(tmp_path/name), frame_width=1024, frame_height=1024),
                                  (256, 256)) == m).all()


def test_render_mask_png_errors(tmp_path):
    p = tmp_path/'wide.png'; Image.fromarray(np.zeros((256, 320), np.uint8)).save(p)
    with pytest.raises(MaskError) as e:
        render_annotation(row(kind='mask', mask_path=str(p), frame_width=1024, frame_height=1024), (256, 256))
    assert e.value.field == 'shape' and e.value.path == str(p) and '320x256' in str(e.value)
    with pytest.raises(MaskError) as e: render_annotation(row(kind='mask', mask_path=str(p)), (256, 256))
    assert e.value.field == 'shape'
    with pytest.raises(MaskError) as e: render_annotation(row(kind='mask', mask_path=str(tmp_path/'nope.png')), (8, 8))
    assert e.value.field == 'mask_path' and 'nope.png' in e.value.path
    bad = tmp_path/'bad.png'; bad.write_bytes(b'not a png')
    with pytest.raises(MaskError) as e: render_annotation(row(kind='mask', mask_path=str(bad)), (8, 8))
    assert e.value.field == 'mask_path' and 'bad.png' in e.value.path
    with pytest.raises(MaskError) as e: render_annotation(row(kind='mask'), (8, 8))
    assert e.value.field == 'mask_path'


def test_render_errors():
    with pytest.raises(MaskError) as e: render_annotation(row(kind='ellipse'), (8, 8))
    assert e.value.field == 'kind' and 'ellipse' in str(e.value)
    with pytest.raises(MaskError) as e: render_annotation(row(kind=np.nan), (8, 8))
    assert e.value.field == 'kind'
    with pytest.raises(MaskError) as e: render_annotation(row(x_min=1, y_min=1, x_max=2), (8, 8), source='bbox.csv')
    assert e.value.field == 'y_max' and e.value.path.startswith('bbox.csv: ') and 'img1' in e.value.path
    with pytest.raises(MaskError) as e: render_annotation(row(x_min=1, y_min=1, x_max=2, y_max=2, frame_width=-4), (8, 8))
    assert e.value.field == 'frame_width'
    with pytest.raises(MaskError) as e: render_annotation(row(kind='polygon', points='[[1, 2]]'), (8, 8))
    assert e.value.field == 'points'


# ---------------------------------------------------------------- lesion_masks
def _anns():
    return pd.DataFrame([
        row(finding='nodule', x_min=0, y_min=0, x_max=2, y_max=2),
        row(finding='nodule', x_min=6, y_min=6, x_max=8, y_max=8),
        row(finding='Pleural Effusion', kind='polygon', points='[[0, 4], [8, 4], [8, 8], [0, 8]]'),
        row(finding='cardiomegaly', kind='rle', rle=rle_encode(box_to_mask((3, 3, 5, 5), (8, 8)))),
        row(finding='fracture', kind='ellipse'),     # not requested: ignored, never rendered
    ])


def test_lesion_masks_channels_and_union():
    anns = _anns()
    per = lesion_masks(anns, ['effusion', 'nodule', 'pneumothorax', 'cardiomegaly'], (8, 8))
    assert per.shape == (4, 8, 8) and per.dtype == np.float32 and set(np.unique(per)) <= {0.0, 1.0}
    assert per[0].sum() == 32 and per[0][4:].all()                       # effusion (published name canonicalised)
    assert per[1].sum() == 8 and per[1][:2, :2].all() and per[1][6:, 6:].all()   # both nodule boxes
    assert per[2].sum() == 0                                             # no annotation -> empty channel
    assert per[3].sum() == 4 and per[3][3:5, 3:5].all()
    uni = lesion_masks(anns, ['effusion', 'nodule', 'pneumothorax', 'cardiomegaly'], (8, 8), union=True)
    assert uni.shape == (1, 8, 8) and (uni[0] == per.max(0)).all()
    only = lesion_masks(anns, ['nodule'], (8, 8), union=True)
    assert only.sum() == 8                                               # union only of the requested findings
    rev = lesion_masks(anns, ['cardiomegaly', 'pneumothorax', 'nodule', 'effusion'], (8, 8))
    assert (rev == per[::-1]).all()
    assert (lesion_masks(anns.to_dict('records'), ['nodule'], (8, 8)) == per[1:2]).all()


def test_lesion_masks_empty_and_errors():
    assert lesion_masks(pd.DataFrame(), ['nodule', 'mass'], (4, 5)).shape == (2, 4, 5)
    assert lesion_masks([], ['nodule'], (4, 5), union=True).sum() == 0
    assert lesion_masks(_anns(), [], (4, 5)).shape == (0, 4, 5)
    with pytest.raises(ValueError, match='distinct'): lesion_masks(_anns(), ['nodule', 'Nodule'], (8, 8))
    with pytest.raises(MaskError) as e: lesion_masks(_anns(), ['fracture'], (8, 8))
    assert e.value.field == 'kind'
    with pytest.raises(MaskError) as e: lesion_masks([row(finding=np.nan)], ['nodule'], (8, 8))
    assert e.value.field == 'finding'


# ---------------------------------------------------------------- helpers
def test_mask_helpers():
    m = box_to_mask((2, 1, 5, 3), (4, 6))
    assert mask_bbox(m) == (2, 1, 5, 3)
    assert mask_centroid(m) == (3.5, 2.0)
    assert mask_area_fraction(m) == pytest.approx(6 / 24)
    assert mask_bbox(np.zeros((3, 3))) is None and mask_centroid(np.zeros((3, 3))) is None
    assert mask_area_fraction(np.zeros((3, 3))) == 0.0
    stack = np.zeros((2, 8, 8), np.float32); stack[0, 0, 0] = 1; stack[1, 7, 5] = 1
    assert mask_bbox(stack) == (0, 0, 6, 8) and mask_area_fraction(stack) == pytest.approx(2 / 64)
    rng = np.random.default_rng(3)
    for _ in range(20):
        x0, y0 = rng.integers(0, 20, 2); x1, y1 = x0 + rng.integers(1, 10), y0 + rng.integers(1, 10)
        b = box_to_mask((x0, y0, x1, y1), (32, 32))
        assert mask_bbox(b) == (x0, y0, x1, y1)
        assert mask_centroid(b) == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2))
    with pytest.raises(ValueError): mask_bbox(np.zeros(5))


# ---------------------------------------------------------------- real sample data
def test_real_masks_rle_round_trip_and_render():
    root = sample_data_root()
    files = sorted((root/'masks').glob('*_seg_*.png'))[:40]
    assert files, 'bundled sample has ChestX-Det masks'
    for k, f in enumerate(files):
        ref = np.asarray(Image.open(f)) > 127
        m = render_annotation(row(kind='mask', mask_path=str(f), frame_width=256, frame_height=256), (256, 256))
        assert (m == ref).all()
        code = rle_encode(ref)
        assert (rle_decode(code, ref.shape) == ref).all()
        if k < 8: assert code == siim_mask2rle(ref)               # the pure-Python reference is slow: a few files


def test_real_boxes_match_shipped_box_masks():
    root = sample_data_root()
    boxes = pd.read_csv(root/'boxes.csv')
    for iid in boxes.image_id.unique()[:60]:
        rows = [row(x_min=r.orig_x, y_min=r.orig_y, x_max=r.orig_x + r.orig_w, y_max=r.orig_y + r.orig_h,
                    frame_width=1024, frame_height=1024) for r in boxes[boxes.image_id == iid].itertuples()]
        ours = lesion_masks(rows, ['nodule'], (256, 256), union=True)[0] > 0
        ref = np.asarray(Image.open(root/'masks'/f'{iid}_bbox.png')) > 127
        assert (ours == ref).all(), iid


# ---------------------------------------------------------------- issue 12: outlines outside their image
def test_box_wholly_outside_its_frame_is_refused():
    far = row(x_min=1100, y_min=10, x_max=1200, y_max=50, frame_width=1024, frame_height=1024)
    with pytest.raises(MaskError, match=r"lies wholly outside its 1024x1024 frame") as e:
        render_annotation(far, (256, 256), source='BBox_List_2017.csv')
    assert e.value.field == 'x_min' and e.value.path.startswith('BBox_List_2017.csv: ') and 'image_id=img1' in e.value.path
    with pytest.raises(MaskError) as e: render_annotation(row(x_min=10, y_min=-90, x_max=50, y_max=-1), (8, 8))
    assert e.value.field == 'y_max'
    anns = pd.DataFrame([row(x_min=1, y_min=1, x_max=3, y_max=3), far])     # one bad row spoils the image
    with pytest.raises(MaskError, match='wholly outside'): lesion_masks(anns, ['nodule'], (256, 256), source='ann.csv')


def test_box_spilling_over_the_edge_is_clipped_with_a_warning():
    r = row(x_min=1000, y_min=100, x_max=1100, y_max=200, frame_width=1024, frame_height=1024)
    with pytest.warns(UserWarning, match=r"bbox.csv: annotation\(image_id=img1.*field 'x_max': box .* spills over the edge"):
        m = render_annotation(r, (256, 256), source='bbox.csv')
    assert m.sum() == 6 * 25 and m[25:50, 250:].all()
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                           # a box inside: no warning
        render_annotation(row(x_min=0, y_min=0, x_max=1024, y_max=1024, frame_width=1024, frame_height=1024), (8, 8))


def test_polygon_outside_and_empty_outlines_are_refused(tmp_path):
    pts = json.dumps([[-50, -50], [-10, -50], [-10, -10]])
    with pytest.raises(MaskError, match='polygon with extent .* wholly outside') as e:
        render_annotation(row(kind='polygon', points=pts), (64, 64))
    assert e.value.field == 'points'
    with pytest.raises(MaskError, match='covers no pixel') as e:                  # zero-size box
        render_annotation(row(x_min=5, y_min=5, x_max=5, y_max=9), (16, 16))
    assert e.value.field == 'x_min'
    with pytest.raises(MaskError, match='covers no pixel') as e:                  # a lesion row with SIIM's "no mask"
        render_annotation(row(kind='rle', rle='-1', frame_width=16, frame_height=16), (16, 16))
    assert e.value.field == 'rle'
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path/'blank.png')
    with pytest.raises(MaskError, match='covers no pixel') as e:
        render_annotation(row(kind='mask', mask_path=str(tmp_path/'blank.png')), (32, 32))
    assert e.value.field == 'mask_path'


def test_tiny_mask_survives_downscaling(tmp_path):
    a = np.zeros((1024, 1024), np.uint8); a[501:503, 700:702] = 255                # 2 x 2 px, < 1 px at 64
    Image.fromarray(a).save(tmp_path/'tiny.png')
    m = render_annotation(row(kind='mask', mask_path=str(tmp_path/'tiny.png'), frame_width=1024, frame_height=1024), (64, 64))
    assert m.sum() == 1 and m[31, 43]
