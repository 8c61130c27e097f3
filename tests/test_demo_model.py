"""The committed CPU demo model is a trained model: its samples look like chest X-rays, an untrained one's do not."""
import numpy as np, torch, pytest
from cxr_diffusion_nbs.core import project_root, sample_data_root
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.dataset import CXRDataset
from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, batch_conditions
from cxr_diffusion_nbs.training import load_for_sampling, conditioning_config, unet_config
from cxr_diffusion_nbs.sampling import sample

DEMO = project_root()/'data'/'models'/'cpu64_demo'

def _mean_image_corr(a, b):
    a, b = a.mean(0).flatten(), b.mean(0).flatten()
    return float(np.corrcoef(a, b)[0, 1])

def test_demo_model_samples_have_chest_anatomy():
    torch.manual_seed(0)
    model, sched, cfg = load_for_sampling(DEMO, device='cpu')
    ds = CXRDataset(load_shared_subset(sample_data_root()), findings=cfg.data.findings, size=cfg.data.image_size,
                    split='train', mask_mode=cfg.data.mask_mode)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    conds = batch_conditions(batch, conditioning_config(cfg))
    x = sample(model, sched, conds, sampler='ddim', steps=20, seed=0).images
    real = torch.stack([ds[i]['image'] for i in range(len(ds))])[:, 0].numpy()
    corr = _mean_image_corr(x[:, 0].numpy(), real)
    untrained = ConditionalDenoiser(unet_config(cfg), conditioning_config(cfg)).eval()
    y = sample(untrained, sched, conds, sampler='ddim', steps=20, seed=0).images
    corr0 = _mean_image_corr(y[:, 0].numpy(), real)
    print(f'corr trained {corr:.3f}, untrained {corr0:.3f}, std {x.std():.3f}')
    assert corr > .8 and corr0 < .5, (corr, corr0)
    assert x.std() > .2   # not a flat mean image
