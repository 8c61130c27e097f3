"""Ship a finished diffusion run as a model folder under data/models: the files a generator needs, small.

Usage:  python tools/ship_model.py runs/cpu256_latent data/models/cpu256_latent_demo
        python tools/ship_model.py runs/cpu64 data/models/cpu64_demo

From the run's newest checkpoint (or the checkpoint folder given) it keeps the EMA weights in float16 (the
training-only files, model weights, optimizer, scheduler and random states, stay behind), the network signature,
`generator.json`, the train state and the run's `config.yaml`, and from the run folder `summary.json` and `log.csv`.
A latent model's autoencoder (`vae/`) is written in float16 too (its weights were shipped in float16, so nothing is
lost), with the autoencoder's own `training.json` when the folder named by the config's `model.autoencoder` holds one.
Recommended sampling defaults already in the destination's `generator.json` are kept. `--guide FOLDER` adds a weaker
model for autoguidance (`guide/`: its EMA weights in float16, signature, train state and config; `11_sampling`), e.g.
the shipped model a longer-trained run started from. The folder is written beside the destination and renamed into
place, so it appears whole or not at all.

        python tools/ship_model.py runs/cpu64_more data/models/cpu64_demo --guide data/models/cpu64_demo
"""
import argparse, json, shutil, os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from cxr_diffusion_nbs.checkpoints import AUTOENCODER_FOLDER, checkpoint_folder, generator_kind, list_checkpoints, load_denoiser
from cxr_diffusion_nbs.sampling import GUIDE_FOLDER
from cxr_diffusion_nbs.core import resolve_path
from cxr_diffusion_nbs.vae import load_autoencoder, save_autoencoder

KEEP = ('model_config.json', 'generator.json', 'train_state.json', 'config.yaml')


def copy_denoiser(ck: Path, out: Path):
    "The EMA weights of checkpoint `ck` in float16, its signature, train state and config, into `out`."
    out.mkdir(parents=True)
    ema = load_file(str(ck/'ema.safetensors'))
    save_file({k: v.to(torch.float16).contiguous() for k, v in ema.items()}, str(out/'ema.safetensors'))
    for name in KEEP:
        if (ck/name).exists(): shutil.copy2(ck/name, out/name)


def ship(run, dest, guide=None) -> Path:
    run, dest = resolve_path(run), Path(dest)
    if guide is not None:                                  # read before dest may be replaced (the guide is often dest)
        gk = checkpoint_folder(resolve_path(guide))
        load_denoiser(gk, device='cpu')                    # refuses anything that is not a diffusion model
    ck = checkpoint_folder(list_checkpoints(run)[-1] if list_checkpoints(run) else run)
    run_dir = ck.parent if not (ck/'summary.json').exists() else ck
    tmp = dest.with_name(f'.tmp-{dest.name}')
    if tmp.exists(): shutil.rmtree(tmp)
    copy_denoiser(ck, tmp)
    if guide is not None:
        copy_denoiser(gk, tmp/GUIDE_FOLDER)
        (tmp/GUIDE_FOLDER/'generator.json').write_text(json.dumps({'kind': generator_kind(gk)}, indent=1))
    for name in ('summary.json', 'log.csv'):
        if (run_dir/name).exists(): shutil.copy2(run_dir/name, tmp/name)
    gen = json.loads((tmp/'generator.json').read_text())
    old = dest/'generator.json'
    if old.exists():
        prev = json.loads(old.read_text())
        gen.update({k: prev[k] for k in ('defaults', 'defaults_why') if k in prev})
    (tmp/'generator.json').write_text(json.dumps(gen, indent=1))
    if (ck/AUTOENCODER_FOLDER).exists():
        save_autoencoder(load_autoencoder(ck/AUTOENCODER_FOLDER, device='cpu'), tmp/AUTOENCODER_FOLDER, dtype=torch.float16)
        src = yaml.safe_load((ck/'config.yaml').read_text()).get('model', {}).get('autoencoder')
        facts = resolve_path(src)/'training.json' if src else None
        if facts is not None and facts.exists(): shutil.copy2(facts, tmp/AUTOENCODER_FOLDER/'training.json')
    if dest.exists():
        for extra in ('README.md',):                       # hand-written notes stay
            if (dest/extra).exists(): shutil.copy2(dest/extra, tmp/extra)
        old_dir = dest.with_name(f'.old-{dest.name}')
        if old_dir.exists(): shutil.rmtree(old_dir)
        os.replace(dest, old_dir)
        os.replace(tmp, dest)
        shutil.rmtree(old_dir)
    else:
        os.replace(tmp, dest)
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('run', help='a run folder (its newest checkpoint) or a checkpoint folder')
    ap.add_argument('dest', help='the model folder to write, e.g. data/models/cpu256_latent_demo')
    ap.add_argument('--guide', help='a weaker version of the model for autoguidance (a model, run or checkpoint folder)')
    a = ap.parse_args()
    d = ship(a.run, a.dest, a.guide)
    print(d, sorted(p.name for p in d.iterdir()), f"{sum(p.stat().st_size for p in d.rglob('*') if p.is_file()) / 1e6:.1f} MB")


if __name__ == '__main__': main()
