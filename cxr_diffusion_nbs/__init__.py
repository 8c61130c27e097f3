"""Lesion-preserving conditional diffusion models for chest X-rays, built step by step in nbdev notebooks

Modules:

- `cxr_diffusion_nbs.unet`: A validated configuration, four presets from "trains in seconds" to "needs a GPU", and the diffusers U-Net and noise scheduler they build, opened up layer by layer."""

__version__ = "0.1.0"
