"""Visual Turing-test kit: blinding (no metadata, neutral names, one size), the answer key matches the kit, seeded
draws, refusals before writing (each naming its field), atomic outputs, form validation, scoring against scipy,
kappas against scikit-learn and the published Fleiss example."""
import json, math, re
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from scipy.stats import binomtest, binom
from sklearn.metrics import cohen_kappa_score
from cxr_diffusion_nbs.core import project_root, sample_data_root, CXRDataError
from cxr_diffusion_nbs.manifest import load_shared_subset, Manifest
from cxr_diffusion_nbs.cohort import load_cohort
from cxr_diffusion_nbs import turing
from cxr_diffusion_nbs.turing import (TuringError, export_turing_kit, draw_cases, read_reader_forms, score_readers,
                                      confusion_table, cohens_kappa, fleiss_kappa, ratings_table, reader_agreement,
                                      simulate_reader, load_answer_key, png_text_chunks, blind_image, allocate,
                                      binomial_power, cases_for_power, FLEISS_WIKIPEDIA_EXAMPLE)

DATA_URI = re.compile(r'data:image/png;base64,[A-Za-z0-9+/=]+')

@pytest.fixture(scope='module')
def real(): return load_shared_subset(sample_data_root())

@pytest.fixture(scope='module')
def syn():
    "Three nodules and three masses of the synthetic cohort shipped in data/synthetic_sample (no sampling here)."
    m = load_cohort(project_root()/'data'/'synthetic_sample')
    im = m.images[m.images.target_finding.isin(['nodule', 'mass'])].groupby('target_finding').head(3).reset_index(drop=True)
    return Manifest(im, m.annotations[m.annotations.image_id.isin(im.image_id)].reset_index(drop=True), m.findings, m.root,
                    m.name, m.origin)

@pytest.fixture(scope='module')
def kit(real, syn, tmp_path_factory):
    return export_turing_kit(real, syn, tmp_path_factory.mktemp('k')/'kit', n_real=6, n_synthetic=6, seed=3)

def key_of(kit): return pd.read_csv(kit/'answer_key.csv', dtype=str, keep_default_na=False)

def refused(fn, field):
    with pytest.raises(TuringError) as e: fn()
    assert e.value.field == field, str(e.value)
    assert f"field '{field}'" in str(e.value)
    return e.value

# ---------------------------------------------------------------- blinding

def test_kit_layout_and_neutral_names(kit):
    files = sorted(str(p.relative_to(kit)) for p in kit.rglob('*') if p.is_file())
    assert files == ['answer_key.csv', 'kit.json', 'readers/contact_sheet.html', 'readers/contact_sheet.pdf',
                     *[f'readers/images/case_{i:03d}.png' for i in range(1, 13)], 'readers/reader.html', 'readers/reader_form.csv']
    assert not [p for p in kit.parent.iterdir() if p.name.startswith('.')]          # no staging or temp files left

def test_images_carry_no_metadata_and_share_size_and_mode(kit, syn):
    assert len(png_text_chunks(syn.images.path.iloc[0])) >= 2                        # the cohort's PNGs do carry text
    assert 'Provenance' in Image.open(syn.images.path.iloc[0]).text
    for p in sorted((kit/'readers'/'images').iterdir()):
        assert png_text_chunks(p) == []
        im = Image.open(p)
        assert (im.size, im.mode) == ((64, 64), 'L')
        assert not getattr(im, 'text', {}) and set(im.info) <= {'dpi'} and 'dpi' not in im.info
        raw = p.read_bytes()
        assert b'SYNTHETIC' not in raw and b'Provenance' not in raw and b'nih_' not in raw

def test_html_and_pdf_do_not_leak(kit):
    key = key_of(kit)
    page = (kit/'readers'/'contact_sheet.html').read_text()
    assert page.count('data:image/png;base64,') == 12
    text = DATA_URI.sub('', page)
    cases = text[text.index('<main'):]
    assert 'synthetic' not in cases.lower() and 'real' not in cases.lower()
    for iid in key.image_id: assert iid not in text
    assert 'syn_' not in text and 'nih_' not in text and 'cohort' not in text.lower()
    assert [m for m in re.findall(r'Case \d{3}', cases)] == [f'Case {i:03d}' for i in range(1, 13)]
    assert 'not disclosed' in text                                                     # prevalence not told by default
    pdf = (kit/'readers'/'contact_sheet.pdf').read_bytes()
    assert pdf.startswith(b'%PDF') and b'syn_' not in pdf and b'nih_' not in pdf
    # the embedded images are the case files, in case order
    import base64
    emb = [base64.b64decode(m.split(',', 1)[1]) for m in DATA_URI.findall(page)]
    assert emb == [(kit/'readers'/'images'/f'{c}.png').read_bytes() for c in key.case_id]

def test_reader_page_embeds_the_case_images_only(kit, real, syn, tmp_path):
    "The page's cases: ids, findings and the kit's own PNGs, in case order (tests/test_reader_page.py drives it in a browser)."
    import base64
    key, meta = key_of(kit), json.loads((kit/'kit.json').read_text())
    page = (kit/'readers'/'reader.html').read_text()
    study = json.loads(re.search(r'<script id="study" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert [c['id'] for c in study['cases']] == key.case_id.tolist() and study['show_finding'] is True
    assert [base64.b64decode(c['img'].split(',', 1)[1]) for c in study['cases']] == \
        [(kit/'readers'/'images'/f'{c}.png').read_bytes() for c in key.case_id]
    assert study['kit'] == meta['kit_id'] and len(meta['kit_id']) == 16 and 'readers/reader.html' in meta['files']
    assert "default-src 'none'" in page and 'not disclosed' in page
    # the same draw gives the same kit id (a reader's saved answers follow it); another draw another id
    same = export_turing_kit(real, syn, tmp_path/'a', n_real=6, n_synthetic=6, seed=3, pdf=False)
    other = export_turing_kit(real, syn, tmp_path/'b', n_real=6, n_synthetic=6, seed=4, pdf=False)
    assert json.loads((same/'kit.json').read_text())['kit_id'] == meta['kit_id'] != json.loads((other/'kit.json').read_text())['kit_id']
    refused(lambda: turing.reader_page_html(key, [], [], True, 'k'), 'images')
    refused(lambda: turing.reader_page_html(key.iloc[:0], [], [], True, 'a b'), 'kit_id')

def test_reader_form_is_empty_and_in_case_order(kit):
    form = pd.read_csv(kit/'readers'/'reader_form.csv', dtype=str, keep_default_na=False)
    assert list(form.columns) == ['case_id', 'finding', 'answer', 'confidence', 'finding_visible', 'comments']
    assert form.case_id.tolist() == [f'case_{i:03d}' for i in range(1, 13)]
    assert (form[['answer', 'confidence', 'finding_visible', 'comments']] == '').all().all()
    assert set(form.finding) == {'nodule', 'mass'}

# ---------------------------------------------------------------- the key matches the kit

def test_answer_key_matches_kit(kit, real, syn):
    key, meta = key_of(kit), json.loads((kit/'kit.json').read_text())
    assert key.case_id.tolist() == [f'case_{i:03d}' for i in range(1, 13)]
    assert key.truth.value_counts().to_dict() == {'real': 6, 'synthetic': 6}
    assert (meta['n_real'], meta['n_synthetic'], meta['seed'], meta['size']) == (6, 6, 3, 64)
    import hashlib
    for _, r in key.iterrows():
        data = (kit/'readers'/'images'/f'{r.case_id}.png').read_bytes()
        assert hashlib.sha256(data).hexdigest() == r.sha256 == meta['files'][f'readers/images/{r.case_id}.png']
        src = (real if r.truth == 'real' else syn).images.set_index('image_id').loc[r.image_id]
        assert r.original_path == src.path
        if r.truth == 'synthetic':   # 64 px already: pixels copied exactly
            assert np.array_equal(np.asarray(Image.open(kit/'readers'/'images'/f'{r.case_id}.png')), np.asarray(Image.open(src.path)))
            assert r.target_finding == src.target_finding == r.finding and r.manifest == syn.name
        else:
            assert (r.original_width, r.target_finding) == ('256', '') and src[r.finding] == 1 and r.manifest == real.name
    # stratified: the real cases show the synthetic cases' findings, in the same numbers
    assert sorted(key[key.truth == 'real'].finding) == sorted(key[key.truth == 'synthetic'].finding)

def test_seeded_reproducibility(real, syn, tmp_path, kit):
    a = export_turing_kit(real, syn, tmp_path/'a', n_real=6, n_synthetic=6, seed=3, pdf=False)
    pd.testing.assert_frame_equal(key_of(a), key_of(kit))
    for c in key_of(a).case_id:
        assert (a/'readers'/'images'/f'{c}.png').read_bytes() == (kit/'readers'/'images'/f'{c}.png').read_bytes()
    b = draw_cases(real, syn, 6, 6, seed=4)
    assert b.image_id.tolist() != key_of(kit).image_id.tolist()

def test_unstratified_findings_filter_and_size(real, syn, tmp_path):
    c = draw_cases(real, syn, 10, 4, seed=0, stratify_by_finding=False)
    assert len(c) == 14 and (c[c.truth == 'real'].finding == '').all()
    c = draw_cases(real, syn, 3, 3, seed=0, findings=['nodule'])
    assert set(c.finding) == {'nodule'} and (real.images.set_index('image_id').loc[c[c.truth == 'real'].image_id, 'nodule'] == 1).all()
    k = export_turing_kit(real, syn, tmp_path/'k', 4, 2, seed=1, size=32, pdf=False, tell_prevalence=True, stratify_by_finding=False)
    assert {Image.open(p).size for p in (k/'readers'/'images').iterdir()} == {(32, 32)}
    assert '4 real and 2 synthetic' in (k/'readers'/'contact_sheet.html').read_text()
    assert 'finding' not in pd.read_csv(k/'readers'/'reader_form.csv').columns       # real cases have no finding to show

def test_allocate():
    assert allocate(6, {'mass': 3, 'nodule': 3}) == {'mass': 3, 'nodule': 3}
    assert allocate(5, {'a': 1, 'b': 1}) == {'a': 3, 'b': 2}
    assert allocate(7, {'a': 5, 'b': 3, 'c': 0}) == {'a': 4, 'b': 3, 'c': 0}
    assert sum(allocate(10, {'a': 7, 'b': 2, 'c': 1}).values()) == 10

def test_blind_image_center_crops_and_strips(tmp_path):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo(); info.add_text('Description', 'SYNTHETIC')
    a = np.zeros((40, 80), np.uint8); a[:, 20:60] = 200
    Image.fromarray(a).save(tmp_path/'x.png', pnginfo=info)
    im, wh = blind_image(tmp_path/'x.png', 40)
    assert wh == (80, 40) and im.size == (40, 40) and np.asarray(im).min() == 200 and not im.info

# ---------------------------------------------------------------- refusals, atomicity

def test_refusals_name_the_field_and_write_nothing(real, syn, tmp_path, kit):
    out = tmp_path/'new'
    refused(lambda: export_turing_kit(real, syn, out, 6, 7), 'n_synthetic')
    refused(lambda: export_turing_kit(real, syn, out, 400, 6), 'n_real')
    refused(lambda: export_turing_kit(real, syn, out, -1, 6), 'n_real')
    refused(lambda: export_turing_kit(real, syn, out, 0, 0), 'n_synthetic')
    refused(lambda: export_turing_kit(real, syn, out, 200, 6), 'n_real')               # not enough nodule/mass positives
    empty = Manifest(real.images.iloc[:0], real.annotations.iloc[:0], real.findings, real.root, 'empty')
    refused(lambda: export_turing_kit(empty, syn, out, 1, 1), 'images')
    refused(lambda: export_turing_kit(real, Manifest(syn.images.iloc[:0], syn.annotations, syn.findings, syn.root, 's'), out, 1, 1), 'images')
    e = refused(lambda: export_turing_kit(real, real, out, 6, 6), 'synthetic')         # no synthetic column
    assert 'cxr14_sample' in e.path
    half = Manifest(syn.images.assign(synthetic=[1, 1, 1, 0, 1, 1]), syn.annotations, syn.findings, syn.root, 'half')
    refused(lambda: export_turing_kit(real, half, out, 6, 6), 'synthetic')
    mixed = Manifest(pd.concat([real.images.assign(synthetic=0), syn.images.iloc[:1]], ignore_index=True), real.annotations,
                     real.findings, real.root, 'mixed', 'mixed.csv')
    e = refused(lambda: export_turing_kit(mixed, syn, out, 6, 6), 'synthetic')
    assert e.path == 'mixed.csv'
    refused(lambda: export_turing_kit(real, syn, out, 6, 6, findings=['hernia']), 'findings')
    refused(lambda: export_turing_kit(real, syn, out, 6, 6, size=0), 'size')
    assert not out.exists()
    before = key_of(kit)
    refused(lambda: export_turing_kit(real, syn, kit, 6, 6), 'out_dir')                # already a kit
    other = tmp_path/'other'; other.mkdir(); (other/'notes.txt').write_text('x')
    refused(lambda: export_turing_kit(real, syn, other, 6, 6, overwrite=True), 'out_dir')
    pd.testing.assert_frame_equal(key_of(kit), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['other']

def test_overwrite_replaces_but_keeps_returned_forms_safe(real, syn, tmp_path):
    k = export_turing_kit(real, syn, tmp_path/'k', 6, 6, seed=0, pdf=False)
    k2 = export_turing_kit(real, syn, tmp_path/'k', 6, 6, seed=1, pdf=False, overwrite=True)
    assert json.loads((k2/'kit.json').read_text())['seed'] == 1
    (k/'returned').mkdir()
    refused(lambda: export_turing_kit(real, syn, k, 6, 6, seed=2, overwrite=True), 'out_dir')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['k']
    (k/'returned').rmdir()
    empty = tmp_path/'empty'; empty.mkdir()
    assert export_turing_kit(real, syn, empty, 2, 2, pdf=False) == empty and (empty/'kit.json').exists()

def test_failure_mid_write_leaves_nothing(real, syn, tmp_path, monkeypatch):
    k = export_turing_kit(real, syn, tmp_path/'k', 6, 6, seed=0, pdf=False)
    old = key_of(k)
    def boom(*a, **kw): raise OSError('disk full')
    monkeypatch.setattr(turing, 'contact_sheet_pdf', boom)
    with pytest.raises(OSError): export_turing_kit(real, syn, tmp_path/'new', 6, 6)
    with pytest.raises(OSError): export_turing_kit(real, syn, k, 6, 6, seed=5, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['k']                         # no staging folder, no new kit
    pd.testing.assert_frame_equal(key_of(k), old)                                      # the old kit untouched

def test_unreadable_image_refused_before_writing(real, syn, tmp_path):
    bad = syn.images.copy(); bad.loc[0, 'path'] = str(tmp_path/'gone.png')
    m = Manifest(bad, syn.annotations, syn.findings, syn.root, 's')
    with pytest.raises(CXRDataError) as e: export_turing_kit(real, m, tmp_path/'k', 6, 6)
    assert 'gone.png' in str(e.value)
    assert not (tmp_path/'k').exists() and [p.name for p in tmp_path.iterdir()] == []

# ---------------------------------------------------------------- forms and scoring

def write_form(path, kit, answers, **cols):
    f = pd.read_csv(kit/'readers'/'reader_form.csv', dtype=str, keep_default_na=False)
    f['answer'] = answers
    for k, v in cols.items(): f[k] = v
    f.to_csv(path, index=False); return path

def test_read_forms_accepts_aliases_and_names_readers(kit, tmp_path):
    key = key_of(kit)
    r = tmp_path/'returned'; r.mkdir()
    write_form(r/'alice.csv', kit, [t[0].upper() for t in key.truth], confidence='5', finding_visible='Yes')
    write_form(r/'bob.csv', kit, [' Real '] * 12)
    f = read_reader_forms(r, kit)
    assert sorted(set(f.reader)) == ['alice', 'bob'] and len(f) == 24
    assert set(f.answer) == {'real', 'synthetic'} and f[f.reader == 'alice'].confidence.eq(5).all()
    assert f[f.reader == 'bob'].confidence.isna().all() and f[f.reader == 'alice'].finding_visible.eq(1).all()
    s = score_readers(f, kit)
    assert s.loc['alice', 'accuracy'] == 1 and s.loc['bob', 'accuracy'] == .5
    assert (s.loc['bob', 'sensitivity'], s.loc['bob', 'specificity']) == (0, 1)
    # a 'reader' column names the reader; 'finding_visible?' header accepted
    g = pd.read_csv(r/'bob.csv', dtype=str, keep_default_na=False).assign(reader='Dr B').rename(columns={'finding_visible': 'finding_visible?'})
    g.to_csv(tmp_path/'x.csv', index=False)
    assert set(read_reader_forms([tmp_path/'x.csv'], kit).reader) == {'Dr B'}

@pytest.mark.parametrize('edit,field,words', [
    (lambda f: f.assign(answer=['maybe'] + ['real'] * 11), 'answer', 'not real/synthetic'),
    (lambda f: f.assign(answer=[''] + ['real'] * 11), 'answer', 'not real/synthetic'),
    (lambda f: f.iloc[1:].assign(answer='real'), 'case_id', 'missing'),
    (lambda f: pd.concat([f, f.iloc[:1]]).assign(answer='real'), 'case_id', 'answered twice'),
    (lambda f: pd.concat([f, f.iloc[:1].assign(case_id='case_099')]).assign(answer='real'), 'case_id', 'unknown'),
    (lambda f: f.assign(answer='s', confidence='7'), 'confidence', '1-5'),
    (lambda f: f.assign(answer='s', finding_visible='perhaps'), 'finding_visible', 'yes/no'),
    (lambda f: f.drop(columns='answer'), 'answer', 'column missing'),
    (lambda f: f.assign(answer='s', reader=['a'] * 6 + ['b'] * 6), 'reader', 'one reader'),
])
def test_bad_forms_name_file_and_field(kit, tmp_path, edit, field, words):
    f = edit(pd.read_csv(kit/'readers'/'reader_form.csv', dtype=str, keep_default_na=False))
    f.to_csv(tmp_path/'reader_X.csv', index=False)
    e = refused(lambda: read_reader_forms([tmp_path/'reader_X.csv'], kit), field)
    assert e.path.endswith('reader_X.csv') and words in str(e)

def test_answer_key_is_not_a_form_and_readers_are_unique(kit, tmp_path):
    refused(lambda: read_reader_forms([kit/'answer_key.csv'], kit), 'truth')
    (tmp_path/'a').mkdir(); (tmp_path/'b').mkdir()
    write_form(tmp_path/'a'/'r.csv', kit, ['r'] * 12); write_form(tmp_path/'b'/'r.csv', kit, ['s'] * 12)
    refused(lambda: read_reader_forms([tmp_path/'a'/'r.csv', tmp_path/'b'/'r.csv'], kit), 'reader')
    refused(lambda: read_reader_forms(tmp_path/'missing.csv', kit), 'file')

def test_scores_match_scipy(kit):
    key = key_of(kit)
    forms = pd.concat([simulate_reader(kit, acc, seed=s).assign(reader=n, file=n)
                       for n, acc, s in (('A', .5, 1), ('B', .9, 2), ('C', .75, 3))], ignore_index=True)
    s = score_readers(forms, kit)
    assert list(s.index) == ['A', 'B', 'C', 'all readers (pooled)']
    d = forms.merge(key[['case_id', 'truth']], on='case_id')
    for r, row in s.iterrows():
        g = d if r.startswith('all') else d[d.reader == r]
        k, n = int((g.answer == g.truth).sum()), len(g)
        t = binomtest(k, n, .5)
        ci = t.proportion_ci(.95, 'exact')
        assert (row.n, row.correct) == (n, k) and math.isclose(row.p_value, t.pvalue, rel_tol=1e-12)
        assert math.isclose(row.ci_low, ci.low) and math.isclose(row.ci_high, ci.high)
        assert math.isclose(row.sensitivity, (g[g.truth == 'synthetic'].answer == 'synthetic').mean())
        assert math.isclose(row.specificity, (g[g.truth == 'real'].answer == 'real').mean())
    c = confusion_table(forms, kit, reader='B')
    assert c.to_numpy().sum() == 12 and c.loc['real'].sum() == 6
    assert c.loc['synthetic', 'synthetic'] + c.loc['real', 'real'] == s.loc['B', 'correct']
    bad = forms.assign(case_id=forms.case_id.replace('case_001', 'case_077'))
    refused(lambda: score_readers(bad, kit), 'case_id')

def test_hand_computed_binomial():
    # 10 of 12: P(X >= 10) + P(X <= 2) under p = 0.5 = 2 * 79 / 4096
    from cxr_diffusion_nbs.turing import _score
    d = pd.DataFrame(dict(answer=['real'] * 10 + ['synthetic'] * 2, truth='real'))
    assert math.isclose(_score(d)['p_value'], 2 * 79 / 4096, rel_tol=1e-12)

# ---------------------------------------------------------------- kappas and power

def test_cohens_kappa_matches_sklearn():
    rng = np.random.default_rng(0)
    for n_cat in (2, 3, 5):
        for _ in range(20):
            a = rng.integers(0, n_cat, 25); b = np.where(rng.random(25) < .6, a, rng.integers(0, n_cat, 25))
            assert math.isclose(cohens_kappa(a, b), cohen_kappa_score(a, b), rel_tol=1e-12, abs_tol=1e-12)
    a, b = ['real', 'synthetic', 'real', 'real'], ['real', 'synthetic', 'synthetic', 'real']
    assert math.isclose(cohens_kappa(a, b), cohen_kappa_score(a, b))
    assert math.isclose(cohens_kappa(list('ssrr'), list('srrr')), .5)                 # po 3/4, pe 1/2
    assert cohens_kappa(list('ssrr'), list('rrss')) == -1 and cohens_kappa(list('rs'), list('rs')) == 1
    assert math.isnan(cohens_kappa(list('rrr'), list('rrr')))
    with pytest.raises(ValueError): cohens_kappa([1, 2], [1])

def test_fleiss_kappa_published_example_and_hand_cases():
    t = FLEISS_WIKIPEDIA_EXAMPLE
    assert t.shape == (10, 5) and set(t.sum(1)) == {14}
    assert round(fleiss_kappa(t), 3) == 0.210
    n, N = 14, 10
    P = ((t**2).sum(1) - n) / (n * (n - 1)); p = t.sum(0) / (N * n)
    assert round(P.mean(), 3) == 0.378 and round((p**2).sum(), 3) == 0.213
    assert math.isclose(fleiss_kappa(ratings_table([['s', 's'], ['s', 'r'], ['r', 'r']])), 1 / 3)
    assert fleiss_kappa(ratings_table([list('sss'), list('rrr')])) == 1
    # two raters with equal marginals: Fleiss = Scott's pi = Cohen's kappa
    a, b = list('ssrrsr'), list('srsrsr')
    assert math.isclose(fleiss_kappa(ratings_table(np.array([a, b]).T)), cohens_kappa(a, b))
    for bad in ([[2, 0], [1, 0]], [[1, 0], [1, 0]], [[-1, 3]], [[0.5, 1.5]]):
        with pytest.raises(ValueError): fleiss_kappa(bad)

def test_reader_agreement(kit):
    fA = simulate_reader(kit, .5, seed=1).assign(reader='A')
    fB = simulate_reader(kit, .9, seed=7).assign(reader='B')
    fC = simulate_reader(kit, seed=2, copy_from=fA, agree=.85).assign(reader='C')
    k, fk = reader_agreement(pd.concat([fA, fB, fC]))
    assert math.isclose(k.loc['A', 'C'], cohen_kappa_score(fA.answer, fC.answer))
    assert math.isclose(k.loc['B', 'A'], cohen_kappa_score(fA.answer, fB.answer))
    table = ratings_table(np.array([fA.answer, fB.answer, fC.answer]).T, ('real', 'synthetic'))
    assert math.isclose(fk, fleiss_kappa(table)) and k.loc['A', 'C'] > k.loc['A', 'B']

def test_binomial_power_matches_enumeration():
    for n, p1 in ((12, .9), (40, .65), (97, .65), (30, .5)):
        rej = [k for k in range(n + 1) if binomtest(k, n, .5).pvalue <= .05]
        assert math.isclose(binomial_power(n, p1), binom.pmf(rej, n, p1).sum(), rel_tol=1e-12)
    assert binomial_power(30, .5) <= .05
    n = cases_for_power(.65, n_max=300)
    assert binomial_power(n, .65) >= .8 > binomial_power(n - 1, .65)
    assert all(binomial_power(m, .65) >= .8 for m in range(n, 300))
    assert cases_for_power(.65, n_max=300, stable=False) <= n
