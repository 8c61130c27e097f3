"""Sampler-side levers against the blur of a diffusion generator: each setting draws the same requests (the first `--n`
validation donors' labels and lesion masks, seed 0), and its films are compared with the real validation films at
64 px by sharpness (median variance of the Laplacian, synthetic / real) and spectral power per octave band
(`realness.spectrum_ratios`). Appends one row per setting to nbs/images/realness_levers.csv, which
nbs/16a_realness shows.

Settings the package's samplers do not expose are built here from diffusers directly: DPM-Solver++ as an SDE
(`algorithm_type='sde-dpmsolver++'`) and guidance only inside a timestep interval (Kynkäänniemi et al. 2024). They are
experiments, not options: neither helped (the notebook shows the table). Stopping at the schedule's smallest noise level
instead of 0 (`final_sigmas_type='sigma_min'`) did, and became the package's sampler 'dpmpp-sigma-min'.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"; the package's option
`autoguidance`, 11_sampling): the prediction is pushed away from a weaker model's, D + w (D - D_weak), each with the
usual classifier-free guidance; `--guide` names the weaker model when the checkpoint has no guide/ folder of its own
(e.g. the shipped demo, when `--checkpoint` is a longer-trained copy of it).

    .venv/bin/python tools/realness_levers.py --checkpoint data/models/cpu64_demo --n 48
    .venv/bin/python tools/realness_levers.py --checkpoint data/models/cpu64_demo --only "ddpm 100" "dpmpp 50"
"""
import argparse, time
import numpy as np, pandas as pd, torch
from diffusers import DPMSolverMultistepScheduler
import cxr_diffusion_nbs.sampling as sampling
from cxr_diffusion_nbs import load_generator
from cxr_diffusion_nbs.core import atomic_write, find_data_root, project_root, resolve_path, shareable_path
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.splits import with_held_out_test
from cxr_diffusion_nbs.classifier import to_size
from cxr_diffusion_nbs.metrics import load_image_set
from cxr_diffusion_nbs.condition_fidelity import donor_requests, draw_requests
from cxr_diffusion_nbs.realness import laplacian_variance, spectrum_ratios

OUT = project_root()/'nbs'/'images'/'realness_levers.csv'
DPMPP = dict(algorithm_type='dpmsolver++', solver_order=2, timestep_spacing='trailing')
# name: (DPM-Solver++ scheduler options or None for the package's own sampler, guidance interval or None, generate options)
SETTINGS = {
    'dpmpp 20 (default)': (None, None, {}),
    'dpmpp 50': (None, None, dict(steps=50)),
    'ddpm 100 (stochastic)': (None, None, dict(sampler='ddpm', steps=100)),
    'sde-dpmpp 20 (stochastic)': (dict(DPMPP, algorithm_type='sde-dpmsolver++'), None, {}),
    'dpmpp 20, stop at sigma_min': (None, None, dict(sampler='dpmpp-sigma-min')),     # became the sampler 'dpmpp-sigma-min'
    'dpmpp 20, guidance only for t in [100, 800]': (None, (100, 800), {}),
    'dpmpp 20, guidance x1.5 (labels 6, mask 3)': (None, None, dict(guidance={'labels': 6, 'mask': 3})),
    'dpmpp 20, autoguidance w=1': (None, None, dict(autoguidance=1.0)),
    'dpmpp 20, autoguidance w=2': (None, None, dict(autoguidance=2.0)),
    'dpmpp 20, autoguidance w=3': (None, None, dict(autoguidance=3.0)),
    'dpmpp 20 stop at sigma_min, autoguidance w=1': (None, None, dict(sampler='dpmpp-sigma-min', autoguidance=1.0)),
    'dpmpp 20 stop at sigma_min, autoguidance w=2': (None, None, dict(sampler='dpmpp-sigma-min', autoguidance=2.0)),
}


class Patched:
    "Within the block, the package's sampler uses `scheduler` options for DPM-Solver++ and guides only for t in `interval`."
    def __init__(self, scheduler, interval):
        self.scheduler, self.interval = scheduler, interval
        self.make, self.pred = sampling.make_sampler, sampling.model_prediction
    def __enter__(self):
        if self.scheduler is not None:
            def make(name, noise_scheduler, steps=None):
                s = DPMSolverMultistepScheduler.from_config(noise_scheduler.config, **self.scheduler)
                s.set_timesteps(sampling.check_sampler(name, noise_scheduler, steps))
                return s
            sampling.make_sampler = make
        if self.interval is not None:
            lo, hi = self.interval
            def pred(model, x, t, conds=None, guidance=None, guidance_mode='compositional', *autoguide):
                return self.pred(model, x, t, conds, guidance if lo <= int(t[0]) <= hi else {}, guidance_mode, *autoguide)
            sampling.model_prediction = pred
    def __exit__(self, *exc):
        sampling.make_sampler, sampling.model_prediction = self.make, self.pred


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default='data/models/cpu64_demo')
    p.add_argument('--guide', help='the weaker model of the autoguidance settings (same conditions and image size)')
    p.add_argument('--n', type=int, default=48, help='requests (validation donors, in order)')
    p.add_argument('--only', nargs='*', help=f'settings to run (default: all of {list(SETTINGS)})')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--output', default=str(OUT))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    gen = load_generator(a.checkpoint, device='cpu')
    man = with_held_out_test(load_shared_subset(find_data_root()), 0.25)
    req = donor_requests(man, 'val', gen.findings, gen.image_size, 64)
    donors = np.arange(min(a.n, len(req.labels)))
    real = to_size(load_image_set(man, size=gen.image_size, split='val')['images'], 64)
    sharp_real = float(np.median(laplacian_variance(real)))
    if a.guide: gen.guide = load_generator(a.guide, device='cpu').model
    rows = []
    for name in a.only or SETTINGS:
        sched, interval, opts = SETTINGS[name]
        if opts.get('autoguidance') and gen.guide is None: raise SystemExit(f'realness_levers: {name!r} needs --guide (the weaker model)')
        with Patched(sched, interval):
            t = time.perf_counter()
            x = draw_requests(gen, req, donors, seed=0, batch=len(donors), **dict(dict(sampler='dpmpp', steps=20, autoguidance=0.0), **opts))
            secs = (time.perf_counter() - t) / len(x)
        x = to_size(x, 64)
        if opts.get('autoguidance'): name = f"{name} (weaker model: {shareable_path(resolve_path(a.guide)) if a.guide else 'its guide/'})"
        row = dict(generator=shareable_path(resolve_path(a.checkpoint)), setting=name, n=len(x), data=man.name,
                   sharpness_ratio=round(float(np.median(laplacian_variance(x))) / sharp_real, 3),
                   **{k: round(v, 3) for k, v in spectrum_ratios(real, x).items()}, seconds_per_image=round(secs, 2))
        print(row, flush=True)
        rows.append(row)
    path = resolve_path(a.output)
    prev = pd.read_csv(path) if path.exists() else pd.DataFrame()
    with atomic_write(path) as tmp: pd.concat([prev, pd.DataFrame(rows)], ignore_index=True).to_csv(tmp, index=False)
    print(f'recorded in {shareable_path(path)}')


if __name__ == '__main__':
    main()
