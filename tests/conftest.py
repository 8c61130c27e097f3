"""Test settings: offline model hubs, a non-interactive matplotlib, and the machine's cores shared out among the
pytest-xdist workers (`-n auto` in pyproject.toml), so that two workers do not each start a thread per core and fight
over them (two torch processes with two threads each on two cores run several times slower than one)."""
import os
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')


def threads_per_worker() -> int:
    "The cores this process may use over the number of xdist workers (all of them when the tests run in one process)."
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')))


THREADS = threads_per_worker()
for _var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):      # the CLIs, kernels and launchers the tests start inherit it
    os.environ[_var] = str(THREADS)

import torch
torch.set_num_threads(THREADS)

# The longest tests first, so that the workers do not end with one of them alone on a long test.
LONG_FIRST = ('test_pipeline.py', 'test_notebooks.py')


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: next((i for i, f in enumerate(LONG_FIRST) if item.path.name == f), len(LONG_FIRST)))
