"""The main job end to end: `cxr-pipeline` (papermill on nbs/21_pipeline.ipynb) with small parameters writes a run
folder whose report shows every part of the study; stage bookkeeping resumes and refuses changed parameters; the
parameters that could fail late are refused before anything is trained; the report's words follow the counts."""
import json, re, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml
from cxr_diffusion_nbs.pipeline import (Stages, PipelineError, markdown_table, check_judges, rarity_study_config, evidence,
                                        rarity_sentences, demo_model, check_generator, sampling_parameters)

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
SAMPLE = ROOT/'data'/'cxr14_sample'
# the bundled sample (what a new user has): the mechanics of every stage; the default run on the shared subset is the
# one whose outputs nbs/21_pipeline.ipynb stores
SMALL = dict(data_root=str(SAMPLE), train_steps=2, train_minutes=1, cohort_per_finding=3, sample_steps=3, classifier_epochs=1,
             classifier_width=8, turing_cases=6, rarity_k=3, rarity_n=4, rarity_config={'n_boot': 100}, mixed_precision='no',
             realness_steps=10, embedding='pca')   # smoke tests: the detectors' figures are 16a_realness's; UMAP is test_metrics'

def pipeline(out, params: dict, progress: bool = False):
    args = [str(BIN/'cxr-pipeline'), '--output', str(out)] + ([] if progress else ['--no-progress'])
    for k, v in params.items(): args += ['-p', k, json.dumps(v) if not isinstance(v, str) else v]
    return subprocess.run(args, capture_output=True, text=True, timeout=1800)

def test_stages_resume_and_refuse(tmp_path):
    s = Stages(tmp_path)
    assert not s.finished('train', {'a': 1})
    s.mark('train', {'a': 1}, steps=2)
    again = Stages(tmp_path)                                  # a new process reads stages.json
    assert again.finished('train', {'a': 1})
    with pytest.raises(PipelineError, match="'train'"): again.finished('train', {'a': 2})

def test_pipeline_small_run(tmp_path):
    out = tmp_path/'run'
    r = pipeline(out, SMALL, progress=True)
    assert r.returncode == 0, (r.stderr[-3000:], r.stdout[-1000:])
    # the terminal shows a line per stage with its time, and text bars inside the long stages (not papermill's cell counter)
    for i, name in enumerate(['data', 'train', 'sample', 'cohort', 'classifier', 'features', 'fidelity', 'conditioning',
                              'memorisation', 'rarity', 'turing', 'report'], 1):
        assert f'stage {i}/12 {name}: done in ' in r.stderr, (name, r.stderr[-3000:])
    assert '] finished in ' in r.stderr and 'Executing' not in r.stderr
    assert re.search(r'\[train\] step (\d+)/\1 \|', r.stderr), r.stderr[-3000:]   # the trainers' progress line (runs.progress_line), at the last step
    for bar in ('synthetic images', 'classifier epochs', 'conditioning requests', 'rarity study'):
        assert f'{bar}: 100%' in r.stderr, (bar, r.stderr[-3000:])
    for f in ('pipeline.ipynb', 'report.md', 'report.html', 'summary.json', 'stages.json', 'figures/samples.png', 'figures/embedding.png',
              'figures/closest_pairs.png', 'figures/rarity.png', 'tables/fidelity.csv', 'tables/memorisation.csv',
              'tables/conditioning_consistency.csv', 'tables/conditioning_adherence.csv', 'tables/conditioning_contrast.csv',
              'tables/conditioning_coverage.csv', 'tables/rarity_table.csv', 'tables/realness.csv', 'rarity/runs.csv', 'cohort/images.csv',
              'turing_kit/answer_key.csv'):
        assert (out/f).exists(), f
    assert set(json.loads((out/'stages.json').read_text())) >= {'train', 'cohort', 'classifier', 'conditioning', 'rarity', 'turing'}
    report = (out/'report.md').read_text()
    # the headline first, in report.md and in report.html (its figures embedded, its sections folded)
    summary = json.loads((out/'summary.json').read_text())
    assert report.index(summary['headline'][0]) < report.index('## ') and len(summary['headline']) == 6
    few = (pd.read_csv(out/'tables'/'rarity_table.csv').query("eval_set == 'test'").test_pos < 20).all()
    head, endpoint = summary['headline'][-1], summary['rarity']['primary_endpoint']     # the declared primary endpoint decides
    assert head.startswith('**Can it support a conclusion?** ' + ('Yes: a gain' if endpoint['lo'] > 0 else 'Yes: a loss' if endpoint['hi'] < 0 else 'No: the interval includes zero'))
    assert f"{endpoint['mean']:+.3f} [{endpoint['lo']:+.3f}, {endpoint['hi']:+.3f}]" in summary['headline'][-2]
    assert ('Secondary, per finding: No: no finding has 20 test positives' in head) == few
    page = (out/'report.html').read_text()
    assert page.count('data:image/png;base64,') == report.count('](figures/') == 4 and 'src="figures/' not in page
    assert page.count('<details>') == report.count('\n## ') and page.index('Can it support a conclusion?') < page.index('<details>')
    assert 'reader.html' in report and (out/'turing_kit'/'readers'/'reader.html').exists()
    for section in ('## Fidelity', '## Diversity', '## Realness', '## Conditioning fidelity', '### Class consistency', '### Mask adherence',
                    '### Lesion contrast', '### Coverage per finding', '## Memorisation', '## Rarity study', '## Reader-study kit'):
        assert section in report, section
    # the generator trained, and the cohort drew its donors, without the held-out test patients
    assert yaml.safe_load((out/'diffusion'/'config.yaml').read_text())['data']['test_fraction'] == .25
    from cxr_diffusion_nbs.cohort import load_real_manifest, load_cohort
    from cxr_diffusion_nbs.splits import with_held_out_test
    split = with_held_out_test(load_real_manifest(SAMPLE), .25).images.set_index('image_id')['split']
    assert (split == 'test').sum() > 0
    assert set(split[load_cohort(out/'cohort').images.donor_image_id]) == {'train'}      # donors linked via private/
    assert 'donor_image_id' not in pd.read_csv(out/'cohort'/'images.csv')                # and never in the shared table
    # the report, summary and tables name no real image and no machine folder (the run folder is outside the repository)
    from cxr_diffusion_nbs.cohort import scan_shared
    real_ids = list(load_real_manifest(SAMPLE).images.image_id)
    for shared in ('report.md', 'summary.json', 'tables', 'figures', 'classifier/classifier.json'):
        hits = scan_shared(out, real_ids + [str(tmp_path), str(ROOT)])
        assert not [h for h in hits if h[0].startswith(shared)], [h for h in hits if h[0].startswith(shared)][:3]
    assert set(pd.read_csv(out/'private'/'memorisation.csv').nn_id) <= set(real_ids)      # the link, kept privately
    # conditioning fidelity: every row says in words what it rests on (the sample's 30 validation films: too few)
    con = pd.read_csv(out/'tables'/'conditioning_consistency.csv')
    assert len(con) == 5 and con.synthetic_auroc.notna().any()
    assert (con.evidence.str.endswith('too few to conclude') == (con.real_positives < 20)).all() and (con.real_positives < 20).all()
    assert con.evidence.iloc[0] in report
    # the rarity study: real-only against three arms, and one sentence per finding that follows its test positives
    rt = pd.read_csv(out/'tables'/'rarity_table.csv')
    assert set(rt.arm) == {'real-only', 'mix', 'unconditional', 'augment'} and set(rt.n) == {0, 4}
    test = rt[rt.eval_set == 'test'].groupby('finding').test_pos.first()
    assert len(test) == 5 and (test > 0).all()
    for f, n in test.items():
        assert f'{f}: {n} test positives' + (': too few to conclude' if n < 20 else ', enough to test') in report, (f, n)
    nb = json.loads((out/'pipeline.ipynb').read_text())
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in nb['cells'])
    assert len(pd.read_csv(out/'cohort'/'images.csv')) == 3 * 5
    summary = json.loads((out/'summary.json').read_text())
    assert len(summary['rarity']['sentences']) == 5 and 'consistency_min' in summary['conditioning']
    # realness: the cohort against the real training films (FID's reference), real test films as the control
    rl = summary['realness']
    assert 'skipped' not in rl and (rl['reference'], rl['control'], rl['px'], rl['n_synthetic']) == ('real train', 'real test', 64, 15)
    aucs = ('detector_auroc', 'detector_auroc_low', 'detector_auroc_high', 'control_auroc', 'sharpness_auroc')
    assert all(0 <= rl[k] <= 1 for k in aucs) and rl['detector_auroc_low'] <= rl['detector_auroc_high']
    assert {'sharpness_ratio', 'spectrum_distance', 'band_1_2', 'band_16_32'} <= set(rl) and rl['sharpness_ratio'] > 0
    assert f"{rl['detector_auroc']:.3f} [{rl['detector_auroc_low']:.3f}, {rl['detector_auroc_high']:.3f}]" in report
    assert f"| control AUROC | {rl['control_auroc']:.3f} |" in report and 'power ratio, 16-32 cycles per image' in report
    assert pd.read_csv(out/'tables'/'realness.csv')['detector_auroc'].iloc[0] == pytest.approx(rl['detector_auroc'])

@pytest.mark.slow
def test_pipeline_latent_run(tmp_path):
    "The same job on the latent config: the latent demo fine-tuned, 256-px cohort images, classified and judged at 128 px."
    from PIL import Image
    out = tmp_path/'run'
    r = pipeline(out, dict(SMALL, train_config='configs/cpu256_latent.yaml', train_overrides={'data.latent_variants': 1},
                           cohort_per_finding=2, turing_cases=2, rarity_config={'n_boot': 100, 'arms': ['mix']}))
    assert r.returncode == 0, (r.stderr[-3000:], r.stdout[-1000:])
    from cxr_diffusion_nbs.checkpoints import generator_kind
    assert generator_kind(out/'diffusion') == 'latent-diffusion'
    cfg = yaml.safe_load((out/'diffusion'/'config.yaml').read_text())
    assert cfg['model']['init_from'].endswith('cpu256_latent_demo') and cfg['data']['image_size'] == 256
    pngs, dicoms = sorted((out/'cohort'/'images').glob('*.png')), sorted((out/'cohort'/'dicom').glob('*.dcm'))
    assert len(pngs) == 10 and {Image.open(p).size for p in pngs} == {(256, 256)}
    import pydicom
    assert len(dicoms) == 10 and (pydicom.dcmread(dicoms[0]).Rows, pydicom.dcmread(dicoms[0]).Columns) == (256, 256)
    assert json.loads((out/'classifier'/'classifier.json').read_text())['config']['image_size'] == 128
    assert '## Rarity study' in (out/'report.md').read_text()

def test_pipeline_refuses_bad_judges_before_training(tmp_path):
    r = pipeline(tmp_path/'run', dict(SMALL, judges=32))
    assert r.returncode != 0 and "field 'judges'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path/'run'/'diffusion').exists()

def test_pipeline_refuses_unknown_parameters_before_anything(tmp_path):
    r = pipeline(tmp_path/'run', {'train_step': 5})
    assert r.returncode == 2 and "field 'train_step'" in r.stderr and "did you mean 'train_steps'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path/'run').exists()

def test_pipeline_refuses_an_output_that_is_a_file(tmp_path):
    f = tmp_path/'run'; f.write_text('x')
    r = pipeline(f, {})
    assert r.returncode == 2 and "'--output': is a file, not a folder" in r.stderr, r.stderr[-2000:]

def test_pipeline_refuses_a_folder_of_other_files(tmp_path):
    o = tmp_path/'mine'; o.mkdir(); (o/'thesis.docx').write_text('x')
    r = pipeline(o, {})
    assert r.returncode == 2 and 'holds files that no pipeline run wrote' in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in o.iterdir()) == ['thesis.docx']

def test_check_judges(tmp_path):
    with pytest.raises(PipelineError, match="'judges'"): check_judges('128', 64)
    with pytest.raises(PipelineError, match='classifier128'): check_judges(128, 64, models=tmp_path)
    for n in ('classifier128', 'segmenter128'): (tmp_path/n).mkdir()
    assert check_judges(128, 64, models=tmp_path) == 128
    assert check_judges(128, 256, models=tmp_path) == 128              # larger images are judged at 128 px
    for n in ('classifier64', 'segmenter64'): (tmp_path/n).mkdir()
    with pytest.raises(PipelineError, match='128 px for larger images'): check_judges(64, 256, models=tmp_path)
    with pytest.raises(PipelineError, match='at least image_size'): check_judges(64, 128, models=tmp_path)

def test_demo_model():
    assert demo_model('configs/cpu64.yaml') == 'data/models/cpu64_demo' and (ROOT/demo_model('configs/cpu64.yaml')).is_dir()
    assert (ROOT/demo_model(ROOT/'configs'/'cpu256_latent.yaml')/'vae').is_dir()
    with pytest.raises(PipelineError, match="'init_from'"): demo_model('configs/gpu256.yaml')

def test_rarity_study_config():
    small = dict(ks=[20], n_synthetic=[0, 50], arms=['mix', 'unconditional', 'augment'], seeds=[0])
    cfg = rarity_study_config(None, .25, **small)
    assert cfg.runs() == [(20, 'real-only', 0, 0), (20, 'mix', 50, 0), (20, 'unconditional', 50, 0), (20, 'augment', 50, 0)]
    assert cfg.test_fraction == .25
    assert rarity_study_config({'seeds': [0, 1]}, .25, **small).seeds == (0, 1)
    full = rarity_study_config(ROOT/'configs'/'rarity.yaml', .25)       # the full study, as a path
    assert full.ks == (20, 50) and len(full.runs()) > len(cfg.runs())
    with pytest.raises(PipelineError, match="'test_fraction'"): rarity_study_config(ROOT/'configs'/'rarity.yaml', .1)
    with pytest.raises(PipelineError, match="'rarity_config'"): rarity_study_config(7, .25)

def test_evidence_and_rarity_sentences():
    assert evidence([41, 13, 1], [False, True, True], 'real positives') == ['41 real positives', '13 real positives: too few to conclude', '1 real positive: too few to conclude']
    t = pd.DataFrame(dict(eval_set=['test'] * 6 + ['test PA'], k=20, n=[0, 50, 50, 0, 50, 50, 50],
                          finding=['nodule'] * 3 + ['effusion'] * 4, arm=['real-only', 'mix', 'augment'] * 2 + ['mix'],
                          test_pos=[4, 4, 4, 60, 60, 60, 30], auroc_diff=[np.nan, .1, 0, np.nan, -.08, .01, .2],
                          p_holm=[np.nan, .2, .9, np.nan, .004, .7, .01],
                          verdict=['reference'] + ['too few to conclude (4 test positives)'] * 2 + ['reference', 'loss',
                                   'no significant difference', 'gain']))
    s = rarity_sentences(t, 20)
    assert s[0].startswith('nodule: 4 test positives: too few to conclude') and 'none of its 2 comparisons' in s[0]
    assert s[1] == ('effusion: 60 test positives, enough to test: mix at n=50 (k=20): loss, AUROC -0.080, Holm p 0.004; '
                    'the others: 1 no significant difference.')
    s_nothing = rarity_sentences(t.assign(verdict=t.verdict.replace({'loss': 'no significant difference'})), 20)
    assert s_nothing[1] == ("effusion: 60 test positives, enough to test: none of its 2 comparisons shows a significant difference "
                            "after Holm's correction.")
    s_untested = rarity_sentences(t.assign(verdict=t.verdict.replace({'loss': 'not tested'})), 20)
    assert s_untested[1].endswith("after Holm's correction (1 not tested, 1 no significant difference).") or \
           s_untested[1].endswith("after Holm's correction (1 no significant difference, 1 not tested).")
    assert rarity_sentences(t, 20, 'test PA') == ['effusion: 30 test positives, enough to test: mix at n=50 (k=20): gain, AUROC +0.200, Holm p 0.01.']

def test_markdown_table():
    assert markdown_table(pd.DataFrame({'x': [0.5]})) == '| x |\n|---|\n| 0.5 |'

def test_generator_parameter():
    "None: the run trains its diffusion model (dpmpp, 20 steps unless told); a model folder of any kind: used as is; anything else refused by name."
    assert check_generator(None) is None and sampling_parameters(None, None, None, {}) == ('dpmpp', 20)
    for bad, msg in (('data/models/nope', 'does not exist'), (3, 'give null'), ('', 'give null'), ('data/cxr14_sample', 'not a generator folder .checkpoint: neither a checkpoint')):
        with pytest.raises(PipelineError, match=f"field 'generator'.*{msg}"): check_generator(bad)
    gan = check_generator('data/models/gan64')
    demo = check_generator(ROOT/'data'/'models'/'cpu64_demo')
    assert (gan.kind, demo.kind) == ('gan', 'pixel-diffusion')
    assert sampling_parameters(gan, None, None, {}) == (None, None) and sampling_parameters(demo, 'ddim', 8, {}) == ('ddim', 8)
    assert sampling_parameters(demo, None, None, {}) == ('dpmpp-sigma-min', 20)         # the sampler the demo recommends
    latent = check_generator(ROOT/'data'/'models'/'cpu256_latent_demo')
    assert sampling_parameters(latent, None, None, {}) == ('heun', 10) and sampling_parameters(latent, None, 6, {}) == ('heun', 6)   # its steps too
    for kw, name in ((dict(sampler='dpmpp'), 'sampler'), (dict(sample_steps=20), 'sample_steps'), (dict(guidance={'labels': 2}), 'guidance')):
        a = {**dict(sampler=None, sample_steps=None, guidance={}), **kw}
        with pytest.raises(PipelineError, match=f"field '{name}'.*the gan generator draws in one pass"):
            sampling_parameters(gan, a['sampler'], a['sample_steps'], a['guidance'])

def test_pipeline_refuses_a_bad_generator_before_anything(tmp_path, capsys):
    "In process (no papermill, no kernel): the CLI refuses an unknown generator folder, or steps for a GAN, and writes nothing."
    from cxr_diffusion_nbs.pipeline import main
    for params, msg in ((['-p', 'generator', 'data/models/nope'], "field 'generator': data/models/nope: not a generator folder"),
                        (['-p', 'generator', 'data/models/gan64', '-p', 'sample_steps', '20'], "field 'sample_steps': 20: a diffusion option")):
        with pytest.raises(SystemExit) as e: main(['--output', str(tmp_path/'run'), '--no-progress', *params])
        assert e.value.code == 2 and msg in capsys.readouterr().err
        assert not (tmp_path/'run').exists()

@pytest.mark.slow
def test_pipeline_gan_run(tmp_path):
    "The shipped GAN as `generator` (about a minute): no training, every evaluation stage, a report that names the generator."
    out = tmp_path/'run'
    small = {k: v for k, v in SMALL.items() if not k.startswith('train_') and k != 'sample_steps'}
    r = pipeline(out, dict(small, generator='data/models/gan64'))
    assert r.returncode == 0, (r.stderr[-3000:], r.stdout[-1000:])
    assert not (out/'diffusion').exists() and 'train' not in json.loads((out/'stages.json').read_text())
    report = (out/'report.md').read_text()
    assert 'Generator: data/models/gan64 (gan), used as given: training skipped.' in report
    assert '(gan, one pass)' in report and 'takes no mask' in report and '## Rarity study' in report
    assert set(pd.read_csv(out/'tables'/'rarity_table.csv').arm) == {'real-only', 'mix', 'augment'}
    from cxr_diffusion_nbs.cohort import load_cohort
    syn = load_cohort(out/'cohort')
    assert len(syn.images) == 15 and syn.images.steps.isna().all() and json.loads((out/'cohort'/'cohort.json').read_text())['generator_kind'] == 'gan'
    assert json.loads((out/'summary.json').read_text())['generator'].startswith('data/models/gan64 (gan)')

def test_report_headline_follows_the_counts():
    "The headline of report.md / report.html: the rarity study's primary comparison and whether it can support a conclusion."
    from cxr_diffusion_nbs.pipeline import report_headline, rarity_primary
    t = pd.DataFrame(dict(eval_set='test', k=[20] * 5 + [50], arm=['mix', 'mix', 'mix', 'mix', 'augment', 'mix'],
                          n=[50, 50, 100, 100, 100, 100], finding=['nodule', 'effusion'] * 3, test_pos=[4, 60] * 3,
                          auroc_real_only=.6, auroc=.65, auroc_diff=[.05, -.08, .01, .02, .03, .04],
                          verdict=['too few to conclude (4 test positives)', 'no significant difference'] * 3))
    first, second = rarity_primary(t, 20)
    assert first.startswith('primary comparison (mix: 100 synthetic images per finding added to k = 20 real')   # largest n, smallest k
    assert 'nodule 0.600 to 0.650 (+0.010, too few to conclude (4 test positives))' in first and '-0.080' not in first
    assert second.startswith('Not as a gain or a loss: 1 of 2 findings have at least 20 test positives')
    assert rarity_primary(t.assign(test_pos=4), 20)[1].startswith('No: no finding has 20 test positives')
    gain = t.assign(verdict=['too few to conclude (4 test positives)', 'gain'] * 3)
    assert rarity_primary(gain, 20)[1] == "Yes, for 1 of 2 findings (at least 20 test positives): effusion: gain after Holm's correction."
    assert rarity_primary(t, 20, arm='negatives')[0].startswith('no negatives arm')
    fid = pd.DataFrame(dict(fid=[.13, 3.45], precision=[.97, .94], recall=[.97, .9], coverage=[.73, .25]),
                       index=pd.Index(['real test (floor)', 'synthetic'], name='comparison'))
    cond = dict(consistency_pneumothorax=.63, consistency_nodule=.7, consistency_min=.63, adherence=.5, too_few=['nodule'])
    h = report_headline('a model', fid, cond, t, 20, realness=dict(detector_auroc=.95, control_auroc=.52),
                        memorisation=dict(flagged=0, synthetic=120))
    assert [l.split('**')[1] for l in h] == ['Trained:', 'Fidelity:', 'Conditioning fidelity:', 'Memorisation:', 'Rarity study',
                                             'Can it support a conclusion?']
    assert 'FID 3.45 against a floor of 0.13' in h[1] and 'AUROC 0.95' in h[1]
    assert 'from 0.63 (pneumothorax) to 0.7' in h[2] and 'too few real positives to conclude: nodule' in h[2]
    assert len(report_headline('a model', fid, cond, t, 20)) == 5                   # no memorisation line when not given
