"""The main job end to end: `cxr-pipeline` (papermill on nbs/21_pipeline.ipynb) with small parameters writes a run
folder whose report shows every part of the study; stage bookkeeping resumes and refuses changed parameters."""
import json, subprocess, sys
from pathlib import Path
import pandas as pd, pytest
from cxr_diffusion_nbs.pipeline import Stages, PipelineError, markdown_table

BIN = Path(sys.executable).parent
# the bundled sample (what a new user has): the mechanics of every stage, in half the time of the shared subset; the
# default run on the shared subset is the one whose outputs nbs/21_pipeline.ipynb stores
SMALL = dict(data_root=str(Path(__file__).parents[1]/'data'/'cxr14_sample'), train_steps=2, train_minutes=1,
             cohort_per_finding=3, sample_steps=3, classifier_epochs=1, classifier_width=8, turing_cases=6, rarity_k=3,
             mixed_precision='no')

def test_stages_resume_and_refuse(tmp_path):
    s = Stages(tmp_path)
    assert not s.finished('train', {'a': 1})
    s.mark('train', {'a': 1}, steps=2)
    again = Stages(tmp_path)                                  # a new process reads stages.json
    assert again.finished('train', {'a': 1})
    with pytest.raises(PipelineError, match="'train'"): again.finished('train', {'a': 2})

def test_pipeline_small_run(tmp_path):
    out = tmp_path/'run'
    args = [str(BIN/'cxr-pipeline'), '--output', str(out), '--no-progress']
    for k, v in SMALL.items(): args += ['-p', k, json.dumps(v) if not isinstance(v, str) else v]
    r = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stderr[-3000:], r.stdout[-1000:])
    for f in ('pipeline.ipynb', 'report.md', 'summary.json', 'stages.json', 'figures/samples.png', 'figures/embedding.png',
              'figures/closest_pairs.png', 'figures/downstream.png', 'tables/fidelity.csv', 'tables/downstream_summary.csv',
              'tables/class_consistency.csv', 'tables/memorisation.csv', 'cohort/images.csv', 'turing_kit/answer_key.csv'):
        assert (out/f).exists(), f
    assert set(json.loads((out/'stages.json').read_text())) >= {'train', 'cohort', 'classifier', 'downstream', 'turing'}
    report = (out/'report.md').read_text()
    for section in ('Fidelity', 'Diversity', 'Mask adherence', 'Class consistency', 'Memorisation', 'Downstream'):
        assert f'## {section}' in report, section
    runs = pd.read_csv(out/'tables'/'downstream_runs.csv')
    assert {'real-only'} < set(runs.condition) and runs.delong_p.notna().any() and runs.auroc_lo.notna().any()
    nb = json.loads((out/'pipeline.ipynb').read_text())
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in nb['cells'])
    assert len(pd.read_csv(out/'cohort'/'images.csv')) == 3 * 5

def test_markdown_table():
    assert markdown_table(pd.DataFrame({'x': [0.5]})) == '| x |\n|---|\n| 0.5 |'
