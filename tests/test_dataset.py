import numpy as np, pandas as pd, pytest, torch
from cxr_diffusion_nbs.core import RARE_FINDINGS, ManifestError, sample_data_root
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.dataset import CXRDataset, Augment, describe, describe_finding, lesion_side, browse_figure, affine_pair

@pytest.fixture(scope='module')
def man(): return load_shared_subset(sample_data_root())

def test_items_and_batches(man):
    ds = CXRDataset(man, size=32, split='train', mask_mode='union')
    assert len(ds) == (man.images.split == 'train').sum()
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False)))
    assert b['image'].shape == (5, 1, 32, 32) and b['mask'].shape == (5, 1, 32, 32)
    assert b['labels'].shape == (5, len(RARE_FINDINGS)) and b['label_known'].dtype == torch.bool
    assert b['image'].min() >= -1 and b['image'].max() <= 1 and b['image'].std() > .1
    assert len(b['text']) == 5 and all(isinstance(t, str) and t for t in b['text'])
    assert 'mask' not in CXRDataset(man, size=32, mask_mode=None)[0]

def test_labels_and_masks_match_the_manifest(man):
    ds = CXRDataset(man, size=64, split=None, mask_mode='per_finding')
    boxes = man.annotations[(man.annotations.kind == 'box') & man.annotations.finding.isin(RARE_FINDINGS)]
    checked = 0
    for iid, g in list(boxes.groupby('image_id'))[:10]:
        i = int(np.flatnonzero(ds.images.image_id == iid)[0])
        it = ds[i]
        row = ds.images.iloc[i]
        annotated = set(man.annotations_for(iid).finding)
        assert it['labels'].tolist() == [float(row[f] == 1 or f in annotated) for f in RARE_FINDINGS]
        for f in g.finding.unique():
            k = RARE_FINDINGS.index(f)
            m = it['mask'][k]
            assert m.sum() > 0, (iid, f)
            # the mask lies where the box is (box coordinates in the 256 frame, dataset at 64 px)
            r = g[g.finding == f].iloc[0]
            cx, cy = (r.x_min + r.x_max) / 2 / 4, (r.y_min + r.y_max) / 2 / 4
            ys, xs = np.nonzero(m.numpy())
            assert xs.min() - 1 <= cx <= xs.max() + 1 and ys.min() - 1 <= cy <= ys.max() + 1
            checked += 1
    assert checked >= 5

def test_text_follows_the_lesion_side(man):
    ds = CXRDataset(man, findings=['nodule'], size=64, split=None, mask_mode='per_finding')
    ann = man.annotations[man.annotations.finding == 'nodule']
    one = ann.groupby('image_id').filter(lambda g: len(g) == 1)   # a single nodule annotation (box or outline)
    one = one[one.kind == 'box']
    assert len(one) >= 4
    for _, r in one.iterrows():
        i = int(np.flatnonzero(ds.images.image_id == r.image_id)[0])
        text = ds[i]['text']
        side = 'right' if (r.x_min + r.x_max) / 2 < 128 else 'left'   # image left = patient right
        assert text.startswith(f'nodule in the {side}'), (r.image_id, text)

def test_describe_rules():
    m = np.zeros((30, 30)); m[0:5, 0:5] = 1
    assert describe_finding('mass', m) == 'mass in the right upper zone'
    assert describe_finding('pneumothorax', None) == 'pneumothorax'
    assert lesion_side(np.zeros((4, 4))) is None
    assert describe({'cardiomegaly': 1, 'effusion': 1}, {'effusion': np.fliplr(m)}) == 'cardiomegaly; left pleural effusion'

def test_augmentation_moves_mask_with_image(man):
    ds = CXRDataset(man, size=64, split=None, mask_mode='union', augment=Augment(rotate=15, translate=.1))
    i = int(np.flatnonzero(ds.images.image_id.isin(man.annotations.image_id))[0])
    plain = CXRDataset(man, size=64, split=None, mask_mode='union')
    img, msk = torch.from_numpy(plain.load(i)[0])[None], torch.from_numpy(plain.load(i)[1])
    a = ds[i]
    assert not torch.equal(a['image'], plain[i]['image'])
    ds.set_epoch(1); b = ds[i]
    assert not torch.equal(a['image'], b['image'])          # a new epoch, new augmentation
    ds.set_epoch(0); assert torch.equal(a['image'], ds[i]['image'])  # reproducible
    # the same affine applied to an image made from the mask reproduces the augmented mask
    p = Augment(rotate=15, translate=.1).params(np.random.default_rng([0, 0, i]))
    _, m2 = affine_pair(img, msk, **p)
    assert torch.equal((m2.amax(0, keepdim=True) > .5).float(), a['mask'])

def test_errors_name_field(man):
    with pytest.raises(ManifestError, match='not_a_finding'): CXRDataset(man, findings=['not_a_finding'])
    with pytest.raises(ManifestError, match="field 'split'"): CXRDataset(man, split='holdout')
    with pytest.raises(ValueError): CXRDataset(man, mask_mode='rgb')

def test_browse_figure_is_a_pure_function(man):
    import matplotlib; matplotlib.use('Agg')
    ds = CXRDataset(man, size=32, split='val')
    fig = browse_figure(ds, 0)
    assert ds.images.image_id[0] in fig.axes[0].get_title()

def test_annotations_outrank_nlp_negatives(man):
    a = man.annotations[man.annotations.finding.isin(RARE_FINDINGS)]
    joined = a.merge(man.images[['image_id'] + list(RARE_FINDINGS)], on='image_id')
    neg = joined[[r[r.finding] == 0 for _, r in joined.iterrows()]]
    assert len(neg), 'the sample should contain an annotated finding whose NIH label is 0'
    iid, f = neg.iloc[0].image_id, neg.iloc[0].finding
    k = RARE_FINDINGS.index(f)
    for trust, want in ((True, 1.), (False, 0.)):
        ds = CXRDataset(man, size=32, split=None, mask_mode='per_finding', trust_annotations=trust)
        it = ds[int(np.flatnonzero(ds.images.image_id == iid)[0])]
        assert it['labels'][k] == want and it['mask'][k].sum() > 0


# ---------------------------------------------------------------- issue 12
def _small(man, images, annotations=None, origin='mine/images.csv'):
    "A manifest of the given image rows (all in split 'train') and annotations."
    from cxr_diffusion_nbs.manifest import Manifest, empty_annotations
    return Manifest(images.assign(split='train').reset_index(drop=True),
                    empty_annotations() if annotations is None else annotations, man.findings, man.root, 'mine', origin)

def test_non_finite_pixels_never_reach_the_model(man, tmp_path, monkeypatch):
    from PIL import Image
    from cxr_diffusion_nbs import dataset
    from cxr_diffusion_nbs.core import ImageReadError
    a = np.full((16, 16), .5, np.float32); a[3, 4] = np.nan
    Image.fromarray(a).save(tmp_path/'nan.tif')                          # the reader refuses it, naming the file
    m = _small(man, man.images.head(1).assign(path=str(tmp_path/'nan.tif')))
    with pytest.raises(ImageReadError, match=r"nan.tif: field 'pixels'"): CXRDataset(m, size=8, split=None)[0]
    # a reader that lets NaN through (a custom one, or a future format): the item refuses it too
    monkeypatch.setattr(dataset, 'read_image', lambda p: a)
    with pytest.raises(ImageReadError, match=r"nan.tif: field 'image': \d+ of 64 pixel values reaching the model are not finite"):
        CXRDataset(m, size=8, split=None)[0]

def test_annotation_outside_its_image_names_manifest_and_image(man):
    # VinDr-style: no frame and no size in the tables, so only reading the image tells where the box falls
    im = man.images[man.images.image_id == man.annotations.image_id.iloc[0]].assign(width=np.nan, height=np.nan)
    an = man.annotations[man.annotations.image_id == im.image_id.iloc[0]].head(1).assign(
        kind='box', x_min=400., x_max=420., y_min=10., y_max=20., frame_width=np.nan, frame_height=np.nan)
    m = _small(man, im, an.reset_index(drop=True))
    ds = CXRDataset(m, findings=[an.finding.iloc[0]], size=8, split=None)
    with pytest.raises(Exception, match=rf"mine/images.csv: annotation\(image_id={im.image_id.iloc[0]}.*field 'x_min': "
                                        r"box .* lies wholly outside its 256x256 frame"):
        ds[0]

def test_examples_grid_titles_are_readable_and_do_not_overlap(man):
    import matplotlib; matplotlib.use('Agg')
    from cxr_diffusion_nbs.dataset import examples_grid
    ds = CXRDataset(man, size=32, split=None, mask_mode='per_finding')
    fig = examples_grid(ds, n=4)
    fig.canvas.draw(); r = fig.canvas.get_renderer()
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    assert len(titles) >= 16
    assert min(t.get_fontsize() for t in titles) >= 9                     # legible when the docs show it ~800 px wide
    assert max(t.get_text().count('\n') for t in titles) <= 1             # at most two lines
    boxes = [t.get_window_extent(r) for t in titles] + [ax.get_window_extent(r) for ax in fig.axes]
    for i, t in enumerate(titles):
        for j, b in enumerate(boxes):
            if j != i and not (j >= len(titles) and fig.axes[j - len(titles)].title is t):
                assert not t.get_window_extent(r).overlaps(b), f'title {t.get_text()!r} overlaps a neighbour'

def test_readme_counts_the_findings_as_the_manifest_does(man):
    from pathlib import Path
    from cxr_diffusion_nbs.core import NIH_FINDINGS
    readme = ' '.join((Path(__file__).parents[1]/'README.md').read_text().split())
    nih = [f for f in man.findings if f in NIH_FINDINGS]
    assert all((man.images[f] == 1).any() for f in nih)                   # the sample covers every NIH finding
    assert f'all {len(nih)} NIH ChestX-ray14 findings' in readme
    assert f'{len(man.findings)} label columns' in readme
