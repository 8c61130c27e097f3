import numpy as np, pandas as pd, pytest
from cxr_diffusion_nbs.core import PatientLeakageError, ManifestError, sample_data_root, RARE_FINDINGS
from cxr_diffusion_nbs.splits import patient_split, check_no_leakage, split_summary

@pytest.fixture(scope='module')
def sample(): return pd.read_csv(sample_data_root()/'manifest.csv', dtype={'patient_id': str})

def test_leakage_is_refused_with_patient_and_field():
    df = pd.DataFrame(dict(patient_id=['p1', 'p1', 'p2'], split=['train', 'test', 'val']))
    with pytest.raises(PatientLeakageError) as e: check_no_leakage(df, source='my_manifest.csv')
    msg = str(e.value)
    assert 'my_manifest.csv' in msg and "field 'patient_id'" in msg and 'p1' in msg and 'p2' not in msg

def test_missing_columns_named():
    with pytest.raises(ManifestError, match="field 'split'"): check_no_leakage(pd.DataFrame(dict(patient_id=['a'])))
    with pytest.raises(ManifestError, match="field 'patient_id'"): patient_split(pd.DataFrame(dict(x=[1])))

def test_blank_splits_ignored():
    check_no_leakage(pd.DataFrame(dict(patient_id=['p1', 'p1', 'p1'], split=['train', '', None])))

def test_split_is_patient_level_stratified_and_deterministic(sample):
    s = patient_split(sample, {'train': .7, 'val': .15, 'test': .15}, seed=3, stratify=RARE_FINDINGS)
    df = sample.assign(split=s)
    check_no_leakage(df)
    assert (df.groupby('patient_id').split.nunique() == 1).all()
    t = split_summary(df, RARE_FINDINGS)
    frac = t.loc[list(RARE_FINDINGS)].div(t.loc[list(RARE_FINDINGS)].sum(axis=1), axis=0)
    # every rare finding gets positives in every split, near the target fractions
    assert (t.loc[list(RARE_FINDINGS), ['train', 'val', 'test']] > 0).all().all()
    assert np.allclose(frac['train'], .7, atol=.12)
    assert list(patient_split(sample, {'train': .7, 'val': .15, 'test': .15}, seed=3, stratify=RARE_FINDINGS)) == list(s)
    assert list(patient_split(sample, seed=4)) != list(patient_split(sample, seed=5))

def test_bad_fractions():
    with pytest.raises(ValueError): patient_split(pd.DataFrame(dict(patient_id=['a'])), {'train': -1, 'test': 1})
