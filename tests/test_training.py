"""Integration tests of the resumable trainer (cxr_diffusion_nbs.training): a tiny run writes its log, checkpoints
and grids; checkpoints are pruned; a run killed mid-way and resumed repeats the uninterrupted one exactly; bad
configs fail before training; the CLI runs under `accelerate launch` with two processes."""
import json, os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cxr_diffusion_nbs.core import cpu_supports_bf16
from cxr_diffusion_nbs.training import (ConfigError, list_checkpoints, load_config, main, prune_checkpoints, train,
                                        unet_config)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/'configs'/'tiny.yaml'
BIN = Path(sys.executable).parent
# one thread per process: the machine is shared, and equal thread counts keep float results comparable
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', MPLBACKEND='Agg')


def tiny(out, *overrides):
    return load_config(TINY, [f'output.output_dir={out}', 'output.progress=false', *overrides])


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "One 4-step tiny run, checkpoint every step, keep 2, grid at step 2 and at the end."
    out = tmp_path_factory.mktemp('tiny')
    summary = train(tiny(out, 'optim.max_steps=4', 'output.checkpoint_every=1', 'output.keep_last=2',
                         'output.sample_every=2'))
    return out, summary


def test_tiny_run_writes_log_checkpoints_and_grids(tiny_run):
    out, s = tiny_run
    assert s['steps'] == 4 and s['start_step'] == 0 and s['resumed_from'] is None
    log = pd.read_csv(out/'log.csv')
    assert log['step'].tolist() == [1, 2, 3, 4]
    assert {'loss', 'loss_mse', 'loss_lesion_mse', 'loss_ssim', 'lr', 'images_per_s'} <= set(log.columns)
    assert np.isfinite(log['loss']).all() and (log['images_per_s'] > 0).all()
    assert log['lr'].iloc[1] == pytest.approx(1e-3)            # end of the 2-step warm-up, then cosine decay
    assert log['lr'].iloc[-1] == pytest.approx(0.0)
    assert [p.name for p in sorted((out/'samples').glob('*.png'))] == ['step-0000002.png', 'step-0000004.png']
    assert (out/'loss.png').stat().st_size > 1000 and (out/'config.yaml').exists()
    ck = out/'checkpoint-4'
    assert {p.name for p in ck.iterdir()} >= {'model.safetensors', 'ema.safetensors', 'ema_state.json', 'optimizer.pt',
                                              'scheduler.pt', 'random_states_0.pt', 'train_state.json', 'config.yaml',
                                              'model_config.json'}
    st = json.loads((ck/'train_state.json').read_text())
    assert st['step'] == 4 and st['num_processes'] == 1
    weights, ema = load_file(str(ck/'model.safetensors')), load_file(str(ck/'ema.safetensors'))
    assert set(ema) <= set(weights) and len(ema) > 10
    diff = max((weights[k] - ema[k]).abs().max().item() for k in ema)
    assert diff > 0                                             # the EMA lags the raw weights
    assert json.loads((ck/'ema_state.json').read_text())['optimization_step'] == 4
    # the saved config reloads to the same run
    assert load_config(ck/'config.yaml').to_dict() == load_config(out/'config.yaml').to_dict()


def test_pruning_keeps_last_k(tiny_run, tmp_path):
    out, _ = tiny_run
    assert [p.name for p in list_checkpoints(out)] == ['checkpoint-3', 'checkpoint-4']
    assert not list(out.glob('.tmp-checkpoint-*'))              # no half-written checkpoint left behind
    d = tmp_path/'run'
    for s in (1, 2, 3, 4, 5):
        (d/f'checkpoint-{s}').mkdir(parents=True); (d/f'checkpoint-{s}'/'train_state.json').write_text('{}')
    (d/'checkpoint-6').mkdir()                                  # incomplete: not a checkpoint
    prune_checkpoints(d, 3)
    assert [p.name for p in list_checkpoints(d)] == ['checkpoint-3', 'checkpoint-4', 'checkpoint-5']


def test_existing_checkpoints_need_resume_and_same_model(tiny_run):
    out, _ = tiny_run
    with pytest.raises(ConfigError, match='resume'):            # would silently overwrite the run otherwise
        train(tiny(out, 'optim.max_steps=6'))
    with pytest.raises(ConfigError, match=r"another config.*block_out_channels"):
        train(tiny(out, 'optim.max_steps=6', 'output.resume=auto', 'model.overrides.block_out_channels=[8, 16]'))
    with pytest.raises(ConfigError, match=r"conditioning.*per_finding|mask_mode"):
        train(tiny(out, 'optim.max_steps=6', 'output.resume=auto', 'data.mask_mode=per_finding'))
    assert [p.name for p in list_checkpoints(out)] == ['checkpoint-3', 'checkpoint-4']   # untouched


BAD = {
    'data.findings=[pneumothorax, nodul]': ("data.findings[1]", "did you mean 'nodule'"),
    'conditioning.mask_mode=per_finding': ("conditioning.mask_mode", "5 mask channel"),
    'data.image_size=33': ("data.image_size", "not divisible"),
    'model.preset=huge': ("model.preset", "unknown U-Net preset"),
    'optim.learning_rate=1e-3': ("optim.learning_rate", "unknown key"),
    'trainer.steps=3': ("trainer", "unknown section"),
    'model.overrides.chanels=2': ("model.overrides.chanels", "UNetConfig"),
    'loss.weight=2': ("loss.weight", "LesionLossConfig"),
    'optim.mixed_precision=fp8': ("optim.mixed_precision", "is not one of"),
    'optim.max_steps=ten': ("optim.max_steps", "not a valid int"),
    'output.guidance={text: 2.0}': ("output.guidance.text", "no such condition"),
    # non-finite numbers pass `> 0` checks: an infinite lr used to train to all-NaN weights
    'optim.lr=.inf': ("optim.lr", "inf is not a finite number"),
    'optim.lr=1e999': ("optim.lr", "inf is not a finite number"),
    'optim.lr=.nan': ("optim.lr", "nan is not a finite number"),
    'optim.weight_decay=.inf': ("optim.weight_decay", "not a finite number"),
    'optim.grad_clip=.inf': ("optim.grad_clip", "not a finite number"),
    'optim.ema_decay=.nan': ("optim.ema_decay", "not a finite number"),
    'optim.ema_power=.inf': ("optim.ema_power", "not a finite number"),
    'optim.noise_offset=-0.1': ("optim.noise_offset", "must be a number in [0, 1)"),
    'optim.noise_offset=true': ("optim.noise_offset", "True is not a valid float"),
    'optim.betas=[0.9, .nan]': ("optim.betas[1]", "not a finite number"),
    'data.balance=.nan': ("data.balance", "not a finite number"),
    'loss.lesion_weight=.inf': ("loss.lesion_weight", "not a finite number"),
    'conditioning.p_drop_labels=.nan': ("conditioning.p_drop_labels", "not a finite number"),
    'output.guidance={labels: .inf}': ("output.guidance.labels", "not a finite number"),
}


@pytest.mark.parametrize('override', list(BAD))
def test_bad_config_fails_before_training(override, tmp_path):
    field, problem = BAD[override]
    out = tmp_path/'never'
    with pytest.raises(ConfigError) as e:
        train(str(TINY), overrides=[f'output.output_dir={out}', override])
    msg = str(e.value)
    assert str(TINY) in msg and f"field '{field}" in msg and problem in msg, msg
    assert not out.exists()                                     # nothing was started


def test_cli_bad_config_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(['--config', str(TINY), '--set', f'output.output_dir={tmp_path}', 'data.image_size=33'])
    assert e.value.code == 2
    assert "field 'data.image_size'" in capsys.readouterr().err


def test_gpu_config_is_valid():
    cfg = load_config(ROOT/'configs'/'gpu256.yaml')
    assert unet_config(cfg).image_size == 256 and cfg.data.mask_mode == 'per_finding'


def _cli(out, *extra):
    exe = BIN/'cxr-train'
    head = [str(exe)] if exe.exists() else [sys.executable, '-m', 'cxr_diffusion_nbs.training']
    # 10 training images, batch 4: 2 batches per epoch, so the run crosses epochs (and augmentation epochs)
    return head + ['--config', str(TINY), '--set', f'output.output_dir={out}', 'output.progress=false',
                   'data.limit=10', 'data.augment=true', 'optim.max_steps=10', 'output.checkpoint_every=3',
                   'output.sample_every=1000', *extra]


def test_kill_and_resume_repeats_the_uninterrupted_run(tmp_path):
    full, killed = tmp_path/'full', tmp_path/'killed'
    r = subprocess.run(_cli(full), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    t0 = time.time()
    while not (killed/'checkpoint-3'/'train_state.json').exists():
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
        assert time.time() - t0 < 240
        time.sleep(0.01)
    p.kill(); p.wait()
    assert p.returncode != 0                                    # really killed, not finished
    logged = pd.read_csv(killed/'log.csv')['step'].max()
    assert 3 <= logged < 10
    r = subprocess.run(_cli(killed, '--resume', 'auto'), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index('{'):])
    assert summary['resumed_from'].endswith('checkpoint-3') and summary['start_step'] == 3
    a, b = pd.read_csv(full/'log.csv'), pd.read_csv(killed/'log.csv')
    assert a['step'].tolist() == b['step'].tolist() == list(range(1, 11))
    assert a['epoch'].tolist() == b['epoch'].tolist() and a['epoch'].max() >= 4
    cols = [c for c in a.columns if c.startswith('loss')] + ['lr']
    np.testing.assert_allclose(b[cols].to_numpy(), a[cols].to_numpy(), rtol=0, atol=1e-6)
    wa, wb = load_file(str(full/'checkpoint-10'/'model.safetensors')), load_file(str(killed/'checkpoint-10'/'model.safetensors'))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.mark.skipif(os.environ.get('CXR_SKIP_ACCELERATE') == '1', reason='CXR_SKIP_ACCELERATE=1')
def test_accelerate_launch_cpu(tmp_path):
    common = ['-m', 'cxr_diffusion_nbs.training', '--config', str(TINY), '--set', 'output.progress=false',
              'output.checkpoint_every=2', 'output.sample_every=1000']
    launch = [str(BIN/'accelerate'), 'launch', '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no']
    # the documented command: in accelerate 1.x `--cpu --num_processes 2` runs the script once (multi-CPU needs mpirun)
    out = tmp_path/'cpu'
    r = subprocess.run(launch + ['--cpu', '--num_processes', '2'] + common + [f'output.output_dir={out}', 'optim.max_steps=2'],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out/'summary.json').read_text())
    assert s['steps'] == 2 and s['device'].startswith('cpu') and s['num_processes'] in (1, 2)
    # two real processes: `--multi_gpu` uses torch.distributed.run; without a GPU they form a gloo group on the CPU
    out = tmp_path/'ddp'
    r = subprocess.run(launch + ['--multi_gpu', '--num_processes', '2'] + common + [f'output.output_dir={out}', 'optim.max_steps=3'],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out/'summary.json').read_text())
    assert s['num_processes'] == 2 and s['steps'] == 3 and s['images_seen'] == 3 * 4 * 2 and s['device'].startswith('cpu')
    assert pd.read_csv(out/'log.csv')['step'].tolist() == [1, 2, 3]
    ck = out/'checkpoint-3'
    assert (ck/'random_states_0.pt').exists() and (ck/'random_states_1.pt').exists()   # per-process RNG states
    assert (out/'samples'/'step-0000003.png').exists() and (out/'loss.png').exists()


def test_time_budget_stops_and_checkpoints(tmp_path):
    out = tmp_path/'budget'
    s = train(tiny(out, 'optim.max_steps=null', 'optim.schedule=constant', 'optim.max_minutes=0.002',
                   'output.sample_every=null'))
    assert 1 <= s['steps'] < 50 and s['elapsed_s'] >= 0.12
    assert list_checkpoints(out)[-1].name == f"checkpoint-{s['steps']}"     # the final state is saved
    assert pd.read_csv(out/'log.csv')['step'].iloc[-1] == s['steps']
    with pytest.raises(ConfigError, match='optim.max_steps'):            # a decaying schedule needs its length
        load_config(TINY, ['optim.max_steps=null', 'optim.max_minutes=1'])

def test_init_from_loads_a_checkpoint_and_refuses_another_network(tmp_path):
    "Fine-tuning starts from the given weights (EMA), and a checkpoint of a different network is refused by name."
    import yaml
    from safetensors.torch import load_file
    from cxr_diffusion_nbs.conditioning import ConditionalDenoiser
    from cxr_diffusion_nbs.training import init_weights, load_config, unet_config, conditioning_config, ConfigError
    from cxr_diffusion_nbs.core import project_root
    demo = project_root()/'data'/'models'/'cpu64_demo'
    cfg = load_config(yaml.safe_load((demo/'config.yaml').read_text()), check_inputs=False)
    model = ConditionalDenoiser(unet_config(cfg), conditioning_config(cfg))
    init_weights(model, demo, cfg)
    ema = load_file(str(demo/'ema.safetensors'))
    for n, p in model.named_parameters(): assert torch.equal(p.detach(), ema[n].float()), n
    tiny = load_config(str(project_root()/'configs'/'tiny.yaml'), [('model.init_from', str(demo))])
    other = ConditionalDenoiser(unet_config(tiny), conditioning_config(tiny))
    with pytest.raises(ConfigError, match='model.init_from'): init_weights(other, demo, tiny)
    with pytest.raises(ConfigError, match='model.init_from'):
        load_config(str(project_root()/'configs'/'tiny.yaml'), [('model.init_from', str(tmp_path/'nope'))])


def test_a_finished_runs_config_opens_where_its_starting_weights_are_gone(tmp_path):
    "A shipped or copied run records `model.init_from`; sampling from it must not need that run, training from it must."
    import shutil, yaml
    from cxr_diffusion_nbs.training import load_for_sampling, load_config, ConfigError
    from cxr_diffusion_nbs.core import project_root
    run = tmp_path/'copied_run'
    shutil.copytree(project_root()/'data'/'models'/'cpu64_demo', run)
    raw = yaml.safe_load((run/'config.yaml').read_text())
    raw['model']['init_from'] = str(tmp_path/'a_run_on_another_machine')
    (run/'config.yaml').write_text(yaml.safe_dump(raw))
    model, sched, cfg = load_for_sampling(run, device='cpu')
    assert cfg.model.init_from == raw['model']['init_from'] and cfg.data.image_size == 64
    with pytest.raises(ConfigError, match=r"model\.init_from.*does not exist"): load_config(str(run/'config.yaml'))


def test_output_folder_that_is_a_file_fails_before_training(tmp_path, capsys):
    f = tmp_path/'taken'; f.write_text('not a folder')
    with pytest.raises(ConfigError, match=r"field 'output\.output_dir': .*taken is a file, not a folder"): train(tiny(f))
    with pytest.raises(ConfigError, match=r"field 'output\.output_dir': .*cannot be created: taken is a file"):
        train(tiny(f/'run'))
    with pytest.raises(SystemExit) as e: main(['--config', str(TINY), '--set', f'output.output_dir={f}'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'is a file, not a folder' in err, err


def _nan_images(monkeypatch, seen):
    "Every training image full of NaN (as a corrupt film would be); `seen` collects the ids served."
    from cxr_diffusion_nbs.dataset import CXRDataset
    get = CXRDataset.__getitem__
    def poisoned(self, i):
        it = dict(get(self, i)); it['image'] = torch.full_like(it['image'], float('nan')); seen.append(it['image_id'])
        return it
    monkeypatch.setattr(CXRDataset, '__getitem__', poisoned)


def test_nan_batch_stops_the_run_naming_step_and_images(tmp_path, monkeypatch):
    from cxr_diffusion_nbs.core import TrainingDivergedError
    seen = []
    cfg = tiny(tmp_path/'run', 'data.limit=8', 'optim.max_steps=3', 'output.checkpoint_every=1', 'output.sample_every=null')
    _nan_images(monkeypatch, seen)
    with pytest.raises(TrainingDivergedError) as e: train(cfg)
    msg = str(e.value)
    assert f"{TINY}: field 'step 1': the loss is nan on the batch of images [" in msg, msg
    batch = seen[-4:]                                            # the 4 images of the failing batch (grid rows come first)
    assert all(i in msg for i in batch), (batch, msg)
    assert list_checkpoints(tmp_path/'run') == [] and not (tmp_path/'run'/'summary.json').exists()


def test_infinite_learning_rate_stops_the_cli_with_one_line(tmp_path, capsys):
    "lr=1e30 passes the config checks (it is finite) but blows the weights up: the run stops, exit status 1, no checkpoint."
    out = tmp_path/'run'
    with pytest.raises(SystemExit) as e:
        main(['--config', str(TINY), '--set', f'output.output_dir={out}', 'output.progress=false', 'optim.lr=1e30',
              'optim.warmup_steps=0', 'data.limit=8', 'optim.max_steps=3', 'output.checkpoint_every=null',
              'output.sample_every=null'])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and err.startswith('cxr-train: training stopped: '), err
    assert "field 'step 2'" in err and 'on the batch of images [' in err and 'optim.lr' in err, err
    assert list_checkpoints(out) == [] and not (out/'summary.json').exists()


def test_check_step_respects_the_fp16_grad_scaler():
    "fp16's GradScaler skips overflowing steps by design: only a non-finite loss, or MAX_OVERFLOWS in a row, stop the run."
    from types import SimpleNamespace
    from cxr_diffusion_nbs.core import TrainingDivergedError
    from cxr_diffusion_nbs.training import MAX_OVERFLOWS, check_step
    def run(scaler):
        acc = SimpleNamespace(device=torch.device('cpu'), num_processes=1, scaler=scaler)
        return SimpleNamespace(acc=acc, overflows=0, step=6, cfg=SimpleNamespace(source='run.yaml'))
    batch, one, inf, nan = {'image_id': ['a', 'b']}, torch.tensor(1.), torch.tensor(float('inf')), torch.tensor(float('nan'))
    r = run(scaler=object())
    for _ in range(MAX_OVERFLOWS - 1): check_step(r, one, inf, batch)
    check_step(r, one, one, batch)
    assert r.overflows == 0                                      # a finite step resets the count
    for _ in range(MAX_OVERFLOWS - 1): check_step(r, one, inf, batch)
    with pytest.raises(TrainingDivergedError, match=rf"run\.yaml: field 'step 7': the gradient norm \({MAX_OVERFLOWS} fp16 "
                                                    r"steps in a row\) is inf on the batch of images \[a, b\]"):
        check_step(r, one, inf, batch)
    with pytest.raises(TrainingDivergedError, match=r"the loss is nan"): check_step(run(scaler=object()), nan, one, batch)
    with pytest.raises(TrainingDivergedError, match=r"the gradient norm is inf"): check_step(run(scaler=None), one, inf, batch)


@pytest.mark.skipif(not cpu_supports_bf16(), reason='no native bf16 on this CPU')
def test_bf16_run_does_not_trip_the_divergence_check(tmp_path):
    "bf16 autocast (no GradScaler): finite losses and gradients of a healthy run pass the check."
    s = train(tiny(tmp_path/'bf16', 'optim.mixed_precision=bf16', 'data.limit=8', 'optim.max_steps=2',
                   'output.checkpoint_every=null', 'output.sample_every=null'))
    assert s['steps'] == 2 and s['mixed_precision'] == 'bf16' and np.isfinite(s['final_loss'])
