"""Store the outputs of a real pipeline run in nbs/21_pipeline.ipynb, so the docs show a finished study.

The pipeline notebook is not executed by the tests (it is the 10-15 minute main job; tests/test_pipeline.py runs it
small with papermill) nor by the docs build, so its stored outputs come from a run of the defaults:

    .venv/bin/cxr-pipeline --output runs/pipeline
    .venv/bin/python tools/store_pipeline_outputs.py runs/pipeline/pipeline.ipynb

Cells are matched by their source; papermill's injected-parameters cell is left out. Images larger than `--max-kb`
are dropped (the figures are also in the run folder), and so is what a cell wrote to stderr (library warnings, not
results). The stored outputs are shared with every reader of the docs: an output that still shows a path of this
machine (the repository's absolute path or the user's home) is refused, naming the cell.
"""
import argparse, json, sys
from pathlib import Path
from shrink_outputs import shrink_notebook   # this folder is on the path when the tool runs as a script

ROOT = Path(__file__).resolve().parents[1]

def machine_paths(output: dict) -> list:
    "The machine-specific paths (this repository's absolute path, the home folder) an output's text shows."
    text = json.dumps({k: v for k, v in output.get('data', {}).items() if not k.startswith('image/')}) + json.dumps(output.get('text', ''))
    return [p for p in {str(ROOT), str(Path.home())} if p not in ('', '/') and p in text]

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('executed', help='the executed notebook of a run (<run>/pipeline.ipynb)')
    p.add_argument('--notebook', default=str(ROOT/'nbs'/'21_pipeline.ipynb'))
    p.add_argument('--max-kb', type=int, default=300)
    a = p.parse_args()
    run = json.loads(Path(a.executed).read_text())
    nb_path = Path(a.notebook)
    nb = json.loads(nb_path.read_text())
    src = lambda c: ''.join(c['source']) if isinstance(c['source'], list) else c['source']
    outputs = {src(c): c.get('outputs', []) for c in run['cells']
               if c['cell_type'] == 'code' and 'injected-parameters' not in c.get('metadata', {}).get('tags', [])}
    n = 0
    for c in nb['cells']:
        if c['cell_type'] != 'code' or src(c) not in outputs: continue
        outs = []
        for o in outputs[src(c)]:
            if o.get('output_type') == 'error': sys.exit(f'the run failed in a cell: {o.get("ename")}: {o.get("evalue")}')
            if o.get('output_type') == 'stream' and o.get('name') == 'stderr': continue
            png = o.get('data', {}).get('image/png')
            if png and len(png) * 3 / 4 / 1024 > a.max_kb: continue
            bad = machine_paths(o)
            if bad: sys.exit(f'an output of the cell starting {src(c)[:60]!r} shows a path of this machine ({bad[0]}); use _shown(...)')
            outs.append(o)
        c['outputs'], n = outs, n + 1
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    saved = shrink_notebook(nb_path)
    print(f'stored the outputs of {n} cells in {nb_path} ({saved / 1e6:.2f} MB saved by tools/shrink_outputs.py)')

if __name__ == '__main__':
    main()
