"""Checkpoint I/O (cxr_diffusion_nbs.checkpoints): every file loads with safetensors, JSON or
`torch.load(weights_only=True)`, so a crafted pickle is refused without running; the shipped demo model opens
without the trainer; a save/load round trip resumes exactly."""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from cxr_diffusion_nbs.core import project_root
from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, ConditioningConfig
from cxr_diffusion_nbs.unet import unet_preset
from cxr_diffusion_nbs.checkpoints import (CheckpointError, checkpoint_folder, generator_kind, list_checkpoints,
                                           load_checkpoint, load_denoiser, load_weights, read_signature, safe_load,
                                           save_checkpoint, weights_file)

DEMO = project_root()/'data'/'models'/'cpu64_demo'


class _Evil:
    "Unpickling this calls os.system: what a malicious .pt file can do to a plain torch.load."
    def __init__(self, flag): self.flag = flag
    def __reduce__(self): return (os.system, (f'touch {self.flag}',))


def _setup():
    torch.manual_seed(0)
    m = ConditionalDenoiser(unet_preset('tiny'), ConditioningConfig(findings=('mass', 'nodule'), mask_mode='union'))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return m, opt, sch, EMAModel(m.parameters(), decay=0.9), torch.Generator().manual_seed(0)


def _step(m, opt, sch, ema, g):
    x = torch.randn(2, 1, 32, 32, generator=g)
    out = m(x, torch.tensor([10, 500]), labels=torch.tensor([[1., 0.], [0., 1.]]), mask=torch.zeros(2, 1, 32, 32))
    loss = out.pow(2).mean()
    loss.backward(); opt.step(); sch.step(); opt.zero_grad(); ema.step(m.parameters())
    return loss.item()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    m, opt, sch, ema, g = _setup()
    _step(m, opt, sch, ema, g)
    sig = {'unet': m.unet_cfg.to_dict(), 'conditioning': m.cond_cfg.to_dict()}
    ck = save_checkpoint(out, 1, accelerator=Accelerator(cpu=True), model=m, optimizer=opt, lr_scheduler=sch, ema=ema,
                         gen=g, config_yaml='optim:\n  lr: 0.001\n', signature=sig,
                         state=dict(step=1, epoch=0, log_sums=(torch.ones(3, dtype=torch.float64), 1)))
    return out, ck, _step(m, opt, sch, ema, g), [p.detach().clone() for p in m.parameters()]


def test_checkpoint_files_and_resume_exactly(saved):
    out, ck, want_loss, want_params = saved
    assert ck == out/'checkpoint-1' and list_checkpoints(out) == [ck] and not list(out.glob('.tmp-*'))
    assert {p.name for p in ck.iterdir()} == {'model.safetensors', 'ema.safetensors', 'ema_state.json', 'optimizer.pt',
                                              'scheduler.pt', 'random_states_0.pt', 'config.yaml', 'model_config.json',
                                              'generator.json', 'train_state.json'}
    assert json.loads((ck/'generator.json').read_text()) == {'kind': 'pixel-diffusion'} and generator_kind(out) == 'pixel-diffusion'
    for f in ('optimizer.pt', 'scheduler.pt', 'random_states_0.pt'):
        torch.load(ck/f, weights_only=True)                      # all loadable the safe way
    m, opt, sch, ema, g = _setup()
    st = load_checkpoint(out, accelerator=Accelerator(cpu=True), model=m, optimizer=opt, lr_scheduler=sch, ema=ema, gen=g)
    assert st['step'] == 1 and st['num_processes'] == 1 and st['log_sums'][1] == 1
    assert _step(m, opt, sch, ema, g) == want_loss
    for p, q in zip(m.parameters(), want_params): assert torch.equal(p, q)


@pytest.mark.parametrize('name', ['optimizer.pt', 'scheduler.pt', 'random_states_0.pt'])
def test_crafted_pickle_is_refused_and_runs_nothing(saved, tmp_path, name):
    _, ck, _, _ = saved
    bad = tmp_path/'checkpoint-1'
    import shutil; shutil.copytree(ck, bad)
    flag = tmp_path/'pwned'
    torch.save({'state': {}, 'param_groups': [], 'rng': _Evil(flag)}, bad/name)
    m, opt, sch, ema, g = _setup()
    with pytest.raises(CheckpointError, match=rf"{name}: field '<file>': refused"):
        load_checkpoint(bad, accelerator=Accelerator(cpu=True), model=m, optimizer=opt, lr_scheduler=sch, ema=ema, gen=g)
    assert not flag.exists()
    with pytest.raises(CheckpointError): safe_load(bad/name)
    assert not flag.exists()


def test_demo_model_opens_without_the_trainer():
    code = ("import sys; from cxr_diffusion_nbs.checkpoints import load_denoiser; "
            "m, s, ck = load_denoiser('data/models/cpu64_demo', device='cpu'); "
            "assert not any(k in sys.modules for k in ('cxr_diffusion_nbs.training', 'cxr_diffusion_nbs.sampling')), "
            "[k for k in sys.modules if k.startswith('cxr_diffusion_nbs')]; "
            "print(ck.name, m.cond_cfg.findings, s.config.prediction_type)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=project_root()/'nbs',
                       env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'cpu64_demo' in r.stdout and "'pneumothorax'" in r.stdout and 'v_prediction' in r.stdout


def test_demo_weights_signature_and_errors(tmp_path):
    model, sched, ck = load_denoiser(DEMO, device='cpu')
    assert ck == DEMO and weights_file(DEMO).name == 'ema.safetensors' and not model.training
    assert read_signature(DEMO)['conditioning']['findings'] == list(model.cond_cfg.findings)
    with pytest.raises(CheckpointError, match="field 'checkpoint'"): checkpoint_folder(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"): load_denoiser(tmp_path/'nope')
    other = ConditionalDenoiser(unet_preset('tiny'), ConditioningConfig())
    with pytest.raises(CheckpointError, match='ema.safetensors'): load_weights(other, DEMO)
    (tmp_path/'train_state.json').write_text('{}')
    with pytest.raises(CheckpointError, match="model_config.json: field '<file>': missing"): read_signature(tmp_path)
    (tmp_path/'generator.json').write_text('{"kind": "gan"}')
    assert generator_kind(tmp_path) == 'gan'
    with pytest.raises(CheckpointError, match='load_generator'): load_denoiser(tmp_path)


def test_corrupt_weights_are_refused_naming_the_file(tmp_path, capsys):
    "A weights file cut short (an interrupted copy or download): cxr-sample exits 2 naming it, before drawing anything."
    import shutil
    from cxr_diffusion_nbs.sampling import main as sample_main
    model = tmp_path/'demo'
    shutil.copytree(project_root()/'data'/'models'/'cpu64_demo', model)
    w = model/'ema.safetensors'
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        sample_main(['--checkpoint', str(model), '--finding', 'nodule', '--n', '1', '--steps', '2', '--output', str(tmp_path/'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'ema.safetensors' in err and 'not a readable safetensors file' in err, err
    assert not (tmp_path/'out').exists()


def _poison(f, name=None):
    "Rewrite safetensors file `f` with one tensor (`name`, else the first) holding a NaN; returns that tensor's name."
    from safetensors.torch import load_file, save_file
    sd = load_file(str(f))
    name = name or sorted(sd)[0]
    sd[name] = sd[name].clone(); sd[name].view(-1)[0] = float('nan')
    save_file(sd, str(f))
    return name


def test_non_finite_weights_are_never_written(tmp_path):
    "A diverged model (a NaN parameter, or a NaN in the EMA) is refused by the saver naming the tensor; no folder appears."
    m, opt, sch, ema, g = _setup()
    kw = dict(accelerator=Accelerator(cpu=True), model=m, optimizer=opt, lr_scheduler=sch, ema=ema, gen=g,
              config_yaml='', signature={}, state=dict(step=1, epoch=0))
    name, p = next(iter(m.named_parameters()))
    with torch.no_grad(): p[(0,) * p.ndim] = float('inf')
    with pytest.raises(CheckpointError, match=rf"checkpoint-1/model\.safetensors: field '{re.escape(name)}': holds NaN or infinite"):
        save_checkpoint(tmp_path, 1, **kw)
    assert list(tmp_path.iterdir()) == []
    with torch.no_grad(): p.zero_()
    ema.shadow_params[0][(0,) * p.ndim] = float('nan')
    with pytest.raises(CheckpointError, match=rf"ema\.safetensors: field '{re.escape(name)}'.*not written"):
        save_checkpoint(tmp_path, 1, **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('fname,use_ema', [('ema.safetensors', True), ('model.safetensors', False)])
def test_non_finite_checkpoint_is_refused_by_the_loaders(saved, tmp_path, fname, use_ema):
    "Weights with a NaN (a diverged run saved by an older version, or edited by hand): refused naming file and tensor."
    import shutil
    _, ck, _, _ = saved
    bad = tmp_path/'checkpoint-1'; shutil.copytree(ck, bad)
    name = _poison(bad/fname)
    with pytest.raises(CheckpointError, match=rf"{fname}: field '{re.escape(name)}': holds NaN or infinite"):
        load_denoiser(bad, use_ema=use_ema, device='cpu')
    m, opt, sch, ema, g = _setup()                               # resuming from it is refused too
    with pytest.raises(CheckpointError, match=rf"{fname}: field '{re.escape(name)}'"):
        load_checkpoint(bad, accelerator=Accelerator(cpu=True), model=m, optimizer=opt, lr_scheduler=sch, ema=ema, gen=g)
