"""How much does the sampling loop cost on top of the network, and what does each sampler cost per image?

For each sampler (DDPM 1000, DDIM 50, DPM-Solver++ 20 and 10 steps by default) it prints the seconds per image of
`cxr_diffusion_nbs.sampling.sample` next to steps x one bare forward of the same model at the same batch, with the
same conditions and precision, and their ratio. Target: the loop (scheduler steps, per-image seeds, condition
checks, clamping) costs <= 5% on top of the network. With guidance every step is one batched forward of (1 + K)
copies, so the bare reference is timed on that batch too. Measured numbers, not a test.

Two overhead columns: `wall` compares the whole run with steps x the bare forward, and so carries the drift of a
minutes-long run on a shared CPU (a few percent either way); `loop` times the same `sample` call with the network
replaced by a zero-cost stand-in, which isolates what the loop itself adds per step, and divides it by the bare
forward. The target applies to `loop`; `wall` shows it holds end to end within timing noise.

    .venv/bin/python benchmarks/bench_sampling.py                      # demo model, batch 8, fp32
    .venv/bin/python benchmarks/bench_sampling.py --batch 16 --bf16 --guidance labels=2
    .venv/bin/python benchmarks/bench_sampling.py --quick              # DDPM 100 instead of 1000
"""
import argparse, statistics, time
from pathlib import Path

import torch

from cxr_diffusion_nbs.checkpoints import load_denoiser
from cxr_diffusion_nbs.conditioning import ellipse_mask, model_inputs
from cxr_diffusion_nbs.sampling import sample, model_prediction, _parse_scales, SAMPLER_LABELS

ROOT = Path(__file__).resolve().parents[1]


def conditions(model, n: int) -> dict:
    "One finding per image (cycling) and a real-sized ellipse lesion mask, built as every caller builds them."
    cc, S = model.cond_cfg, model.unet_cfg.image_size
    findings = [[cc.findings[i % len(cc.findings)]] for i in range(n)]
    mask = torch.from_numpy(ellipse_mask(S, .35, .4, .1, .08)) if cc.mask_mode is not None else None
    return model_inputs(model, n, findings=findings if cc.use_labels else None, masks=mask, where='bench_sampling')


@torch.no_grad()
def bare_forward_s(model, conds, n, guidance, bf16, reps: int) -> float:
    "Median seconds of one network evaluation (guided: the whole batched (1+K)-copy pass), nothing else."
    S = model.unet_cfg.image_size
    x = torch.randn(n, 1, S, S)
    t = torch.full((n,), 500, dtype=torch.long)
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            model_prediction(model, x, t, conds, guidance)
        if i >= 2: times.append(time.perf_counter() - t0)
    return statistics.median(times)


class ZeroNet(torch.nn.Module):
    "The model's interface (configs, input checks) with a free forward: what is left of `sample` is the loop itself."
    def __init__(self, model):
        super().__init__()
        self.model, self.unet_cfg, self.cond_cfg = model, model.unet_cfg, model.cond_cfg
        self.anchor = torch.nn.Parameter(torch.zeros(1))          # so sample() finds a device
    def check_inputs(self, *a, **k): return self.model.check_inputs(*a, **k)
    def forward(self, x, t, validate=True, **k): return torch.zeros_like(x)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default=str(ROOT/'data'/'models'/'cpu64_demo'))
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--bf16', action='store_true')
    p.add_argument('--guidance', default='', help='e.g. labels=2,mask=1 (default: none)')
    p.add_argument('--quick', action='store_true', help='DDPM with 100 steps instead of 1000')
    p.add_argument('--threads', type=int, default=None)
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    model, ns, _ = load_denoiser(a.checkpoint, device='cpu')
    n, guidance = a.batch, _parse_scales(a.guidance)
    conds = conditions(model, n)
    runs = [('ddpm', 100 if a.quick else 1000), ('ddim', 50), ('dpmpp', 20), ('dpmpp', 10)]
    fwd = bare_forward_s(model, conds, n, guidance, a.bf16, reps=20)
    print(f"model: {a.checkpoint} | batch {n} | {'bf16' if a.bf16 else 'fp32'} | guidance {guidance or 'none'} | "
          f"torch threads {torch.get_num_threads()}")
    print(f"bare forward: {fwd * 1000:.1f} ms per batch ({fwd / n * 1000:.2f} ms per image)\n")
    print(f"{'sampler':>13} {'steps':>5} {'s/image':>9} {'steps x bare fwd':>17} {'wall':>8} {'loop ms/step':>13} {'loop':>8}")
    zero = ZeroNet(model)
    for name, steps in runs:
        sample(model, ns, conds, sampler=name, steps=min(steps, 5), guidance=guidance, seed=0,
               mixed_precision='bf16' if a.bf16 else 'no')                      # warm-up
        fwd = bare_forward_s(model, conds, n, guidance, a.bf16, reps=10)        # re-measured next to each run
        t0 = time.perf_counter()
        sample(model, ns, conds, sampler=name, steps=steps, guidance=guidance, seed=0, mixed_precision='bf16' if a.bf16 else 'no')
        total = time.perf_counter() - t0
        ref = steps * fwd
        t0 = time.perf_counter()
        sample(zero, ns, conds, sampler=name, steps=steps, guidance=guidance, seed=0)
        loop = (time.perf_counter() - t0) / steps
        print(f"{SAMPLER_LABELS[name]:>13} {steps:>5} {total / n:>9.3f} {ref / n:>17.3f} {total / ref - 1:>+8.1%} "
              f"{loop * 1000:>13.2f} {loop / fwd:>+8.2%}")
    print('\ntarget: loop overhead <= +5% of the network (scheduler step, per-image seeds, checks, clamping)')


if __name__ == '__main__':
    main()
