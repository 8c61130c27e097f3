"""A training lever of issue 23, measured and not kept: an adversarial term on the denoiser's x0 prediction at low noise.

Fine-tunes the shipped 64-px demo as `cxr-train` does (configs/cpu64.yaml, unaugmented films, lr 3e-4, float32) for
`--minutes` CPU-minutes, with one addition: a projection discriminator (gan64's architecture, `gan.ProjectionDiscriminator`)
judges the denoiser's x0 prediction for the batch items with t < `--max-t` against the batch's real films (hinge loss,
DiffAugment, lazy R1 every 4 steps), and the denoiser adds `--weight` x s x (-D(x0_hat)), where s matches the norm of
the adversarial gradient at the U-Net's last layer to the diffusion loss's (the adaptive weight of Esser et al. 2021).
The discriminator is not part of the checkpoint (a run killed midway starts it afresh). The run folder gets the demo's
`generator.json`, so that `bench_realism.py` draws from it with the demo's recommended settings:

    .venv/bin/python benchmarks/lever_adversarial_x0.py --output runs/lever/ft64_adversarial          # 12 CPU-min
    .venv/bin/python benchmarks/bench_realism.py --n 120 --generators runs/lever/ft64_adversarial data/models/gan64

Measured in nbs/16a_realness ("A GAN-style term at low noise"): sharpness and spectrum come to real films' values,
the detector does not move and FID gets worse, so the lever is not part of the trainer.
"""
import argparse, inspect, shutil
import torch

from cxr_diffusion_nbs import training
from cxr_diffusion_nbs.core import project_root
from cxr_diffusion_nbs.forward import predicted_x0
from cxr_diffusion_nbs.gan import ProjectionDiscriminator, d_loss_fn, g_loss_fn, r1_penalty, diff_augment


class AdversarialX0:
    "The discriminator, its optimiser and the term the denoiser adds (with one discriminator step per call)."
    def __init__(self, weight: float, max_t: int, start: int = 30, r1_gamma: float = 0.2, r1_every: int = 4, seed: int = 0):
        torch.manual_seed(seed)
        self.d = ProjectionDiscriminator(image_size=64, n_findings=5, channels=24, max_channels=192)
        self.opt = torch.optim.Adam(self.d.parameters(), lr=2e-4, betas=(0.0, 0.99))
        self.aug_gen = torch.Generator().manual_seed(seed + 7)
        self.weight, self.max_t, self.start, self.r1_gamma, self.r1_every = weight, max_t, start, r1_gamma, r1_every

    def __call__(self, run, pred, x0, x_t, t, labels, loss):
        sel = t < self.max_t
        if not bool(sel.any()): return loss.new_zeros(())
        x0_hat, y = predicted_x0(pred.float(), x_t, t, run.noise_sched)[sel], labels[sel]
        aug = lambda im: diff_augment(im, self.aug_gen, 0.125)
        d_loss = d_loss_fn(self.d(aug(x0), labels), self.d(aug(x0_hat.detach()), y))
        if run.step % self.r1_every == 0: d_loss = d_loss + self.r1_gamma / 2 * self.r1_every * r1_penalty(self.d, x0, labels)
        self.opt.zero_grad(set_to_none=True); d_loss.backward(); self.opt.step()
        if run.step < self.start: return loss.new_zeros(())
        for p in self.d.parameters(): p.requires_grad_(False)
        g = g_loss_fn(self.d(aug(x0_hat), y))
        for p in self.d.parameters(): p.requires_grad_(True)
        last = run.core.unet.conv_out.weight
        g_rec, = torch.autograd.grad(loss, last, retain_graph=True)
        g_adv, = torch.autograd.grad(g, last, retain_graph=True)
        return self.weight * (g_rec.norm() / (g_adv.norm() + 1e-8)).clamp(max=1e4).detach() * g


def with_adversarial_term(term: AdversarialX0):
    "`training.train_step` with the term added to the loss before the backward pass (the trainer's own step otherwise)."
    src = inspect.getsource(training.train_step)
    old = "    run.acc.backward(loss)\n"
    assert old in src, 'training.train_step changed: update this lever'
    training.__dict__['ADVERSARIAL_X0'] = term
    exec(src.replace(old, "    loss = loss + ADVERSARIAL_X0(run, pred, x0, x_t, t, batch['labels'].to(dev), loss)\n" + old), training.__dict__)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--output', default='runs/lever/ft64_adversarial')
    p.add_argument('--weight', type=float, default=0.1)
    p.add_argument('--max-t', type=int, default=300, help='judge x0 predictions of steps t < max_t (of 1000)')
    p.add_argument('--minutes', type=float, default=12.0)
    p.add_argument('--steps', type=int, default=530, help="the cosine schedule's length (the time cap may end the run first)")
    a = p.parse_args(argv)
    with_adversarial_term(AdversarialX0(a.weight, a.max_t))
    demo = project_root()/'data'/'models'/'cpu64_demo'
    training.main(['--config', str(project_root()/'configs'/'cpu64.yaml'), '--set', f'model.init_from={demo}',
                   f'optim.max_steps={a.steps}', f'optim.max_minutes={a.minutes}', 'optim.lr=0.0003', 'optim.warmup_steps=30',
                   'optim.mixed_precision="no"', f'output.output_dir={a.output}', 'output.sample_every=null', 'output.resume=auto'])
    shutil.copy(demo/'generator.json', a.output)


if __name__ == '__main__': main()
