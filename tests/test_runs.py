"""Tests of the run skeleton every trainer shares (cxr_diffusion_nbs.runs), on a toy trainer that fits y = 3 x with one
weight: a run killed mid-way (its step raises) and resumed with resume='auto' ends equal to the uninterrupted one, its
CSV log cut back to the checkpoint; a NaN step is refused naming the step; a bad override or a resume with another
network is refused naming the field; the command line `make_main` builds."""
import json
from dataclasses import dataclass, field

import pandas as pd
import pytest
import torch
import torch.nn as nn

from cxr_diffusion_nbs.checkpoints import list_checkpoints, read_weights
from cxr_diffusion_nbs.core import ConfigError, TrainingDivergedError
from cxr_diffusion_nbs.runs import (Every, Run, RunConfig, RunOutputSection, fit, guard_step, load_run_checkpoint, make_main,
                                    prepare_folder, start_checks, write_summary)


@dataclass
class ToyOptim:
    batch_size: int = 4
    lr: float = 0.1
    max_steps: int | None = 10
    max_minutes: float | None = None
    grad_clip: float | None = None
    seed: int = 0


@dataclass
class ToyOutput(RunOutputSection):
    output_dir: str = 'runs/toy'
    log_every: int = 2
    checkpoint_every: int | None = 3
    progress: bool = False


@dataclass
class ToyConfig(RunConfig):
    optim: ToyOptim = field(default_factory=ToyOptim)
    output: ToyOutput = field(default_factory=ToyOutput)
    inputs: dict = field(default_factory=lambda: {'n': 1})      # a plain mapping section; part of the signature
    def signature(self) -> dict: return {'inputs': self.inputs.get('n', 1)}


@dataclass(eq=False)
class ToyRun(Run):
    net: nn.Linear
    opt: torch.optim.Optimizer
    gen: torch.Generator
    images_seen: int = 0
    counters, generators, optimisers = ('images_seen',), ('gen',), {'optimizer.pt': 'opt'}
    def networks(self) -> dict: return {'model.safetensors': self.net}
    def lr(self) -> float: return self.opt.param_groups[0]['lr']
    def batch_ids(self) -> list: return [f'toy-{self.step + 1}-{i}' for i in range(self.cfg.optim.batch_size)]


def toy_step(run: ToyRun) -> dict:
    x = torch.randn(run.cfg.optim.batch_size, 1, generator=run.gen)
    loss = ((run.net(x) - 3 * x) ** 2).mean()
    loss.backward()
    guard_step(run, loss, run.net.parameters())
    run.opt.step(); run.opt.zero_grad()
    run.step += 1; run.images_seen += len(x)
    return {'loss': loss.item(), 'w': run.net.weight.item(), 'odd': run.step if run.step % 2 else None}


def train_toy(cfg: ToyConfig, step=toy_step, stop_after=None):
    ckpt = start_checks(cfg)
    net = nn.Linear(1, 1, bias=False); nn.init.zeros_(net.weight)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.optim.lr, momentum=0.5)       # momentum: state a resume must restore
    run = ToyRun(net, opt, torch.Generator().manual_seed(cfg.optim.seed), cfg=cfg)
    if ckpt is not None: load_run_checkpoint(run, ckpt)
    prepare_folder(run, ckpt)
    f = fit(run, step, [Every('evens', 2, lambda r: r.step, at_end=True)], stop_after=stop_after)
    if f.stopped_at is not None: return f.stopped()
    return write_summary(run, dict(steps=run.step, start_step=f.start_step, images_seen=run.images_seen, w=run.net.weight.item(),
                                   last_checkpoint=f.checkpoint and f.checkpoint.name, evens=f.last('evens')))


def toy(out, *overrides) -> ToyConfig:
    return ToyConfig.read({}, [f'output.output_dir={out}', *overrides])


def killed_at(k: int):
    "A step that raises at step `k`, as a kill would stop the run there."
    def step(run):
        if run.step + 1 == k: raise RuntimeError('killed')
        return toy_step(run)
    return step


def test_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    full = train_toy(toy(tmp_path/'full'))
    assert (full['steps'], full['images_seen'], full['last_checkpoint'], full['evens']) == (10, 40, 'checkpoint-10', 10)
    cut = toy(tmp_path/'cut')
    with pytest.raises(RuntimeError, match='killed'): train_toy(cut, killed_at(9))
    assert [p.name for p in list_checkpoints(tmp_path/'cut')] == ['checkpoint-3', 'checkpoint-6']
    assert pd.read_csv(tmp_path/'cut'/'log.csv')['step'].tolist() == [2, 4, 6, 8]   # step 8's row: after the checkpoint
    with pytest.raises(ConfigError, match='--resume auto'): train_toy(cut)         # not overwritten by accident
    (tmp_path/'cut'/'.log.csv.k1lled_x.csv').write_text('half')                 # what a kill mid-write leaves
    resumed = train_toy(ToyConfig.read(cut, ['output.resume=auto']))
    assert (resumed['start_step'], resumed['steps'], resumed['images_seen']) == (6, 10, 40)
    a, b = (read_weights(tmp_path/r/'checkpoint-10'/'model.safetensors') for r in ('full', 'cut'))
    assert torch.equal(a['weight'], b['weight']) and resumed['w'] == full['w']
    la, lb = (pd.read_csv(tmp_path/r/'log.csv') for r in ('full', 'cut'))
    assert lb['step'].tolist() == [2, 4, 6, 8, 10]                          # cut back to step 6 on resume: step 8 once
    cols = ['step', 'loss', 'w', 'odd', 'lr']
    pd.testing.assert_frame_equal(la[cols], lb[cols])
    assert la['odd'].tolist() == [1, 3, 5, 7, 9]                            # a value logged every other step: its own mean
    assert la['loss'].iloc[-1] < la['loss'].iloc[0] / 10 and abs(full['w'] - 3) < 0.2   # it learns
    assert not (tmp_path/'cut'/'.log.csv.k1lled_x.csv').exists()
    st = json.loads((tmp_path/'cut'/'checkpoint-10'/'train_state.json').read_text())
    assert (st['step'], st['images_seen'], st['model']) == (10, 40, {'inputs': 1})


def test_stop_after_and_a_resume_with_nothing_left_to_do(tmp_path):
    assert train_toy(toy(tmp_path), stop_after=4) == {'stopped_at': 4, 'last_checkpoint': 'checkpoint-3'}
    assert train_toy(toy(tmp_path, 'output.resume=auto'))['steps'] == 10
    again = train_toy(toy(tmp_path, 'output.resume=auto'))                  # nothing left: no new checkpoint, no new row
    assert again['start_step'] == again['steps'] == 10 and again['last_checkpoint'] is None and again['evens'] is None
    assert [p.name for p in list_checkpoints(tmp_path)] == ['checkpoint-9', 'checkpoint-10']
    assert pd.read_csv(tmp_path/'log.csv')['step'].tolist() == [2, 4, 6, 8, 10]


def test_a_nan_step_is_refused_naming_the_step_and_its_batch(tmp_path):
    def nan_at_3(run):
        if run.step == 2: run.net.weight.data.fill_(float('nan'))
        return toy_step(run)
    with pytest.raises(TrainingDivergedError, match=r"field 'step 3': the loss is nan on the batch of images \[toy-3-0, toy-3-1"):
        train_toy(toy(tmp_path), nan_at_3)
    assert [p.name for p in list_checkpoints(tmp_path)] == []               # step 3 checkpoints nothing
    assert pd.read_csv(tmp_path/'log.csv')['step'].tolist() == [2]


def test_the_config_door_names_the_field(tmp_path):
    cfg = ToyConfig.read({'optim': {'lr': 0.2}}, ['optim.max_steps=6', 'inputs.n=2'])
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.inputs, cfg.output.keep_last) == (0.2, 6, {'n': 2}, 2)
    assert ToyConfig.read(cfg).to_dict() == cfg.to_dict()
    bad = {'optim.max_steps=ten': "field 'optim.max_steps': 'ten' is not a valid int",
           'optim.max_step=3': "field 'optim.max_step': unknown key for ToyOptim; did you mean 'max_steps'",
           'optm.lr=1': "field 'optm.lr': unknown section; did you mean 'optim'",
           'output.keep_lst=1': "did you mean 'keep_last'"}
    for ov, msg in bad.items():
        with pytest.raises(ConfigError, match=msg): ToyConfig.read({}, [ov])
    f = tmp_path/'run.yaml'
    f.write_text('optim:\n  batch_size: four\n')
    with pytest.raises(ConfigError, match=r"run\.yaml: field 'optim\.batch_size'"): ToyConfig.read(f)
    with pytest.raises(ConfigError, match="field 'inputs': must be a mapping"): ToyConfig.read({'inputs': 3})


def test_a_resume_with_another_network_or_into_a_file_is_refused(tmp_path):
    train_toy(toy(tmp_path/'run'))
    with pytest.raises(ConfigError, match=r"field 'model\.inputs': cannot resume from .*another network.*\(inputs: 1 there, 2 here\)"):
        start_checks(toy(tmp_path/'run', 'output.resume=auto', 'inputs.n=2'))
    (tmp_path/'taken').write_text('')
    with pytest.raises(ConfigError, match=r"field 'output\.output_dir': taken is a file, not a folder"):
        start_checks(toy(tmp_path/'taken'))


def test_the_command_line(tmp_path, capsys):
    main = make_main('toy-train', 'a toy', ToyConfig.read, train_toy, 'toy.yaml', 'optim.max_steps=2')
    f = tmp_path/'toy.yaml'
    f.write_text('optim:\n  max_steps: 4\n')
    main([str(f), '--output', str(tmp_path/'a'), '--set', 'output.checkpoint_every=2', 'optim.lr=0.1'])
    assert json.loads(capsys.readouterr().out)['steps'] == 4
    main(['--config', str(f), '--output', str(tmp_path/'a'), '--resume', 'auto', '--set', 'optim.max_steps=6'])
    assert json.loads(capsys.readouterr().out)['start_step'] == 4
    with pytest.raises(SystemExit) as e: main([str(f), '--set', 'optim.lr=fast'])
    assert e.value.code == 2 and "toy-train: refused: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main([])                          # no config at all
    assert e.value.code == 2
