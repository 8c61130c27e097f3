"""Rebuild `data/cxr14_sample` and `data/dicom` from the shared NIH ChestX-ray14 subset.

Run from the project root: `python tools/make_sample.py [SHARED_ROOT]` (default `../shared/data`).
The sample keeps the shared layout (manifest.csv, boxes.csv, segments.csv, images/, masks/) so the same
adapter (`cxr_diffusion_nbs.datasets.load_shared_subset`) reads both. Selection is deterministic (seed 0):
every image with a ChestX-Det lesion mask, then up to 24 images per NIH finding (those with radiologist
boxes first), then 40 "No Finding" images.
"""
import shutil, sys
from pathlib import Path
import pandas as pd

NIH = ['atelectasis', 'cardiomegaly', 'consolidation', 'edema', 'effusion', 'emphysema', 'fibrosis', 'hernia',
       'infiltration', 'mass', 'nodule', 'pleural_thickening', 'pneumonia', 'pneumothorax']

def main(shared=Path('../shared/data'), out=Path('data')):
    src = shared/'nih_cxr14_subset'
    man = pd.read_csv(src/'manifest.csv', dtype=str, keep_default_na=False)
    man = man[man.source == 'nih_chestxray14']
    chosen = list(man.loc[man.seg_mask_paths != '', 'image_id'])
    for f in NIH:
        pos = man[(man[f] == '1') & ~man.image_id.isin(chosen)]
        pos = pd.concat([pos[pos.n_boxes != '0'], pos[pos.n_boxes == '0']])
        have = man[man.image_id.isin(chosen) & (man[f] == '1')].shape[0]
        chosen += list(pos.image_id[:max(0, 24 - have)])
    nf = man[(man.no_finding == '1') & ~man.image_id.isin(chosen)].sample(40, random_state=0)
    chosen += list(nf.image_id)
    # keep every image of a chosen patient, so patient-level splits stay honest on the sample
    pats = set(man.loc[man.image_id.isin(chosen), 'patient_id'])
    sub = man[man.patient_id.isin(pats)].sort_values('image_id')
    dst = out/'cxr14_sample'
    if dst.exists(): shutil.rmtree(dst)
    (dst/'images').mkdir(parents=True); (dst/'masks').mkdir()
    for _, r in sub.iterrows():
        shutil.copy2(src/r.path, dst/r.path)
        for m in [r.mask_path] + [p for p in r.seg_mask_paths.split('|') if p]:
            if m: shutil.copy2(src/m, dst/m)
    sub.to_csv(dst/'manifest.csv', index=False)
    for name in ['boxes.csv', 'segments.csv']:
        t = pd.read_csv(src/name, dtype=str, keep_default_na=False)
        t[t.image_id.isin(sub.image_id)].to_csv(dst/name, index=False)
    dsrc, ddst = shared/'nih_cxr14_subset_dicom', out/'dicom'
    if ddst.exists(): shutil.rmtree(ddst)
    shutil.copytree(dsrc, ddst)
    print(f"{len(sub)} images of {sub.patient_id.nunique()} patients -> {dst}")
    print(sub[NIH + ['no_finding']].astype(int).sum().to_string())

if __name__ == '__main__':
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path('../shared/data'))
