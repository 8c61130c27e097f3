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
