"""Lesion-preserving conditional diffusion models for chest X-rays, built step by step in nbdev notebooks

Modules:

- `cxr_diffusion_nbs.cohort`: Turn a trained conditional model into a dataset: target counts per finding (or "balance every finding to the most frequent"), conditions drawn from real patients' labels and lesion masks (jittered in position, size and rotation within where that finding occurs), PNGs (and optionally DICOMs marked synthetic) plus a manifest in the real data's schema with the provenance of every image, and a mixer of real and synthetic images at a chosen ratio.
- `cxr_diffusion_nbs.conditioning`: One denoiser that can be told *which* findings to draw (labels), *where* (a lesion mask) and *how* to describe them (a text prompt), in any combination, with each condition dropped independently during training so that classifier-free guidance can turn each one up or down separately.
- `cxr_diffusion_nbs.ilvr`: Steer a trained sampler with real images, without retraining: at every step the low frequencies of $x_t$ are pulled towards a noised reference (a healthy chest for the anatomy, a real lesion patch for the pathology), each through its own low-pass filter, until its own stop step.
- `cxr_diffusion_nbs.inpainting`: Put a lesion of a chosen finding inside a chosen mask of a real, healthy chest X-ray and leave every pixel outside it as it was, with RePaint resampling (Lugmayr et al., CVPR 2022) on our conditional denoiser.
- `cxr_diffusion_nbs.manifest`: A `Manifest` (an images table, an annotations table and a finding vocabulary) and adapters that read NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, SIIM-ACR, VinDr-CXR, ChestX-Det and the bundled sample into it.
- `cxr_diffusion_nbs.sampling`: The reverse process written out step by step: a diffusers scheduler proposes each move, the conditional denoiser (with a separate classifier-free guidance scale for labels, mask and text) supplies the prediction, and the same seed always gives the same image.
- `cxr_diffusion_nbs.training`: One YAML file describes a run; `train()` runs it on a CPU, a GPU or several processes, and continues exactly where it stopped after a crash or a kill.
- `cxr_diffusion_nbs.unet`: A validated configuration, four presets from "trains in seconds" to "needs a GPU", and the diffusers U-Net and noise scheduler they build, opened up layer by layer."""

__version__ = "0.1.0"
