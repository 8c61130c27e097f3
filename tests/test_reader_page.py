"""The reader page of a kit (`readers/reader.html`) and the pipeline's `report.html`, driven in a real browser: headless
Chromium (Debian's `chromium`, which .ci/run installs) through `playwright`. A reader takes the whole study with the
keyboard alone, goes back to change an answer, reopens the page, downloads the form, and the package scores it as
given. Skipped, saying why, where the browser or playwright is missing."""
import json, re, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from cxr_diffusion_nbs.core import project_root, sample_data_root
from cxr_diffusion_nbs.manifest import load_shared_subset, Manifest
from cxr_diffusion_nbs.cohort import load_cohort
from cxr_diffusion_nbs.turing import export_turing_kit, read_reader_forms, score_readers

sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install -e ".[dev]")')
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
if not Path(CHROMIUM).is_file():
    pytest.skip('Debian chromium is not installed (apt-get install -y chromium; .ci/run installs it as root)',
                allow_module_level=True)
# without these flags a closed network makes chromium wait for services it cannot reach
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync']
STUDY = re.compile(r'<script id="study" type="application/json">(.*?)</script>', re.S)

@pytest.fixture(scope='module')
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()

@pytest.fixture(scope='module')
def kits(tmp_path_factory):
    "A 12-case kit that names each case's finding, and a 6-case one that does not (unstratified: real cases have none)."
    real = load_shared_subset(sample_data_root())
    m = load_cohort(project_root()/'data'/'synthetic_sample')
    im = m.images[m.images.target_finding.isin(['nodule', 'mass'])].groupby('target_finding').head(3).reset_index(drop=True)
    syn = Manifest(im, m.annotations[m.annotations.image_id.isin(im.image_id)].reset_index(drop=True), m.findings, m.root,
                   m.name, m.origin)
    d = tmp_path_factory.mktemp('kits')
    return (export_turing_kit(real, syn, d/'kit', n_real=6, n_synthetic=6, seed=3, pdf=False),
            export_turing_kit(real, syn, d/'plain', n_real=3, n_synthetic=3, seed=1, pdf=False, stratify_by_finding=False))

def key_of(kit): return pd.read_csv(kit/'answer_key.csv', dtype=str, keep_default_na=False)

def open_page(browser, url):
    ctx = browser.new_context(accept_downloads=True, viewport={'width': 1200, 'height': 800})
    page = ctx.new_page()
    page.errors, page.requests = [], []
    page.on('pageerror', lambda e: page.errors.append(str(e)))
    page.on('request', lambda r: page.requests.append(r.url))
    page.goto(url)
    return ctx, page

def pressed(page, field):
    "The value of `field` whose button shows as chosen on the current case ('' if none)."
    b = page.locator(f'button[data-field="{field}"][aria-pressed="true"]')
    return b.get_attribute('data-value') if b.count() else ''

def film(page):
    "The grey values the page shows (its canvas, at the image's own size), once the case's image is drawn."
    page.wait_for_function('raw !== null')
    w, h, values = page.evaluate("(() => { const c = document.getElementById('film'); "
                                 "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; })()")
    return np.array(values, dtype=float)[::4].reshape(h, w)

def test_a_reader_takes_the_study_with_the_keyboard(browser, kits, tmp_path):
    kit = kits[0]
    key = key_of(kit)
    n = len(key)
    ctx, page = open_page(browser, (kit/'readers'/'reader.html').as_uri())
    assert 'not disclosed' in page.inner_text('#start')                           # the study's instructions
    page.keyboard.type('Dr K'); page.keyboard.press('Enter')
    given = {}
    for i, r in key.iterrows():
        assert page.inner_text('#case-label') == f"Case {r.case_id.split('_')[1]}"
        assert page.inner_text('#progress') == f'case {i + 1} of {n}'
        assert page.inner_text('#finding') == r.finding.replace('_', ' ')
        conf, vis = str(i % 5 + 1), 'yn'[i % 2]
        for k in (r.truth[0], conf, vis): page.keyboard.press(k)
        given[r.case_id] = dict(answer=r.truth, confidence=float(conf), finding_visible=float(vis == 'y'))
        if i == 1:                                                                 # a comment, typed after C, left with Esc
            page.keyboard.press('c'); page.keyboard.type('=2+2, "odd" shadow'); page.keyboard.press('Escape')
        assert (pressed(page, 'answer'), pressed(page, 'confidence')) == (r.truth, conf)
        page.keyboard.press('Enter')
    assert page.is_visible('#done') and page.is_enabled('#download')
    assert page.evaluate('document.activeElement.id') == 'download'
    # back to case 3 with the arrow key, change its answer
    for _ in range(n - 2): page.keyboard.press('ArrowLeft')
    assert page.inner_text('#progress') == f'case 3 of {n}'
    case3 = np.asarray(Image.open(kit/'readers'/'images'/f'{key.case_id[2]}.png'), dtype=float)
    assert np.abs(film(page) - case3).max() <= 1                                  # after ten quick steps, case 3's own film
    changed = key.case_id[2]
    wrong = 'real' if key.truth[2] == 'synthetic' else 'synthetic'
    page.keyboard.press(wrong[0])
    given[changed]['answer'] = wrong
    # closed and reopened: the reader id and every answer are still there, and the page resumes where it was
    page.reload()
    assert page.input_value('#reader') == 'Dr K'
    page.keyboard.press('Enter')
    assert page.inner_text('#progress') == f'case 3 of {n}' and pressed(page, 'answer') == wrong
    assert page.inner_text('#answered') == f'{n} of {n} answered'
    page.keyboard.press('ArrowLeft')
    assert pressed(page, 'answer') == key.truth[1] and page.input_value('#comments') == '=2+2, "odd" shadow'
    # window/level and zoom move with the keys, and change the pixels shown
    before = page.evaluate("document.getElementById('film').toDataURL()")
    for k in ('ArrowUp', 'ArrowUp', ']', '+'): page.keyboard.press(k)
    assert page.inner_text('#wl') == 'level 144, width 320, zoom 1.25x'
    assert page.evaluate("document.getElementById('film').toDataURL()") != before
    page.keyboard.press('0')
    # to the end, and the form downloaded from the keyboard
    for _ in range(n - 1): page.keyboard.press('Enter')
    assert page.is_visible('#done')
    with page.expect_download() as dl: page.keyboard.press('Enter')
    returned = tmp_path/'returned'; returned.mkdir()
    form = returned/dl.value.suggested_filename
    dl.value.save_as(form)
    assert form.name == 'reader_Dr_K.csv' and not page.errors
    assert all(u.startswith(('file:', 'data:', 'blob:')) for u in page.requests), page.requests   # nothing from a network
    ctx.close()
    # the file is the kit's form, read and scored as it is
    blank = pd.read_csv(kit/'readers'/'reader_form.csv', dtype=str, keep_default_na=False)
    got = pd.read_csv(form, dtype=str, keep_default_na=False)
    assert list(got.columns) == list(blank.columns) + ['reader'] and got.case_id.tolist() == blank.case_id.tolist()
    assert (got.finding == blank.finding).all()
    forms = read_reader_forms(returned, kit)
    assert set(forms.reader) == {'Dr K'}
    for r in forms.itertuples():
        assert (r.answer, r.confidence, r.finding_visible) == tuple(given[r.case_id].values()), r
    assert forms.set_index('case_id').loc[key.case_id[1], 'comments'] == '\'=2+2, "odd" shadow'   # no formula for a spreadsheet
    s = score_readers(forms, kit)
    assert (s.loc['Dr K', 'n'], s.loc['Dr K', 'correct']) == (n, n - 1)                # the changed answer counts as given
    assert s.loc['Dr K', 'accuracy'] == pytest.approx((n - 1) / n)

def test_the_form_waits_for_every_case_and_asks_only_what_the_study_asks(browser, kits, tmp_path):
    kit = kits[1]                                                                  # no finding named: no Y / N
    key = key_of(kit)
    ctx, page = open_page(browser, (kit/'readers'/'reader.html').as_uri())
    page.keyboard.press('Enter')
    assert 'reader id' in page.inner_text('#reader-msg') and page.is_visible('#start')   # an id is asked for first
    page.fill('#reader', 'R2'); page.keyboard.press('Enter')
    assert page.locator('button[data-field="finding_visible"]').count() == 0 and page.locator('#finding').count() == 0
    page.keyboard.press('s'); page.keyboard.press('Enter')                          # case 1: no confidence
    for _ in range(len(key) - 1): page.keyboard.press('Enter')                      # the others skipped
    assert page.is_visible('#done') and not page.is_enabled('#download')
    assert f'{len(key)} of {len(key)} cases are not answered yet' in page.inner_text('#done-msg')
    page.keyboard.press('Enter')                                                    # "go to the first unanswered case"
    assert page.inner_text('#progress') == f'case 1 of {len(key)}' and pressed(page, 'answer') == 'synthetic'
    for i, r in key.iterrows():
        page.keyboard.press('s' if i % 2 else 'r'); page.keyboard.press('3'); page.keyboard.press('y')   # y: not asked here
        page.keyboard.press('Enter')
    with page.expect_download() as dl: page.keyboard.press('Enter')
    form = tmp_path/dl.value.suggested_filename
    dl.value.save_as(form)
    ctx.close()
    got = pd.read_csv(form, dtype=str, keep_default_na=False)
    assert list(got.columns) == ['case_id', 'answer', 'confidence', 'finding_visible', 'comments', 'reader']
    assert (got.finding_visible == '').all() and (got.confidence == '3').all()
    s = score_readers(read_reader_forms(form, kit), kit)
    assert s.loc['R2', 'called_synthetic'] == len(key) // 2

def test_the_page_carries_no_truth(kits):
    for kit in kits:
        key = key_of(kit)
        page = (kit/'readers'/'reader.html').read_text()
        study = json.loads(STUDY.search(page).group(1))
        assert [c['id'] for c in study['cases']] == key.case_id.tolist()            # case order, the form's ids
        assert all(set(c) == {'id', 'finding', 'img'} for c in study['cases'])
        text = re.sub(r'data:image/png;base64,[A-Za-z0-9+/=]+', '', page)
        for v in [*key.image_id, *key.original_path, *key.manifest, *key.sha256, str(project_root()), 'original_path']:
            assert v not in text, v
        for word in ('syn_', 'nih_', 'cohort', 'truth', 'answer_key', '.png', '.dcm'):
            assert word not in text.lower(), word
        cases = json.dumps([{k: v for k, v in c.items() if k != 'img'} for c in study['cases']])
        assert 'synthetic' not in cases and 'real' not in cases
        assert study['kit'] == json.loads((kit/'kit.json').read_text())['kit_id']

def test_report_page_opens_with_every_figure(browser, tmp_path):
    "`report.html` from a small run folder: the headline first, each section folded, every figure embedded and drawn."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from cxr_diffusion_nbs.pipeline import report_html, markdown_table, PipelineError
    (tmp_path/'figures').mkdir()
    for name in ('samples', 'rarity'):
        fig, ax = plt.subplots(figsize=(3, 2)); ax.plot([0, 1], [1, 0]); ax.set_title(name)
        fig.savefig(tmp_path/'figures'/f'{name}.png', dpi=60); plt.close(fig)
    wide = pd.DataFrame({f'column {i}': [i / 7, i * 1000] for i in range(24)})
    md = '\n'.join(['# A pipeline report', '', '- **Trained:** a model', '- **Can it support a conclusion?** No.', '',
                    'Run folder `run`.', '', '## Samples', '', '![samples](figures/samples.png)', '',
                    '## Fidelity', '', markdown_table(wide), '', '## Rarity study', '', 'Text <b>not html</b>.', '',
                    '![rarity](figures/rarity.png)', ''])
    (tmp_path/'report.html').write_text(report_html(md, tmp_path), encoding='utf-8')
    ctx, page = open_page(browser, (tmp_path/'report.html').as_uri())
    assert page.title() == 'A pipeline report'
    assert page.locator('details').count() == 3 and page.locator('details[open]').count() == 0
    assert page.locator('.headline li').all_inner_texts() == ['Trained: a model', 'Can it support a conclusion? No.']
    assert page.locator('summary').all_inner_texts() == ['Samples', 'Fidelity', 'Rarity study']
    assert not page.is_visible('table')                                              # the tables are folded away
    assert page.locator('b').count() == 0                                            # Markdown's raw HTML escaped
    for s in page.locator('summary').all(): s.click()                                # a reader opens the sections
    assert page.is_visible('table') and page.locator('th').count() == 24
    imgs = page.locator('img')
    assert imgs.count() == 2
    assert page.evaluate('Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)') == [True, True]
    assert page.evaluate('Array.from(document.images).every(i => i.src.startsWith("data:image/png;base64,"))')
    assert not page.errors and all(u.startswith(('file:', 'data:')) for u in page.requests), page.requests
    ctx.close()
    with pytest.raises(PipelineError, match="figures/gone.png: field 'figure'"): report_html('## A\n\n![x](figures/gone.png)', tmp_path)
    with pytest.raises(PipelineError, match='not an image file of the run folder'): report_html('![x](../secret.png)', tmp_path)
