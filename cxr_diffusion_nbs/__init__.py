"""Lesion-preserving conditional diffusion models for chest X-rays, built step by step in nbdev notebooks

Modules:

- `cxr_diffusion_nbs.adherence`: Two judges trained on real radiographs check whether synthetic images show what they were asked for: the classifier of `15_classifier` scores **class consistency** (AUROC of the requested findings on synthetic images) and a small lesion U-Net scores **mask adherence** (Dice and IoU between its segmentation of a synthetic image and the lesion mask that image was conditioned on), each next to its ceiling on real images and a shuffled control.
- `cxr_diffusion_nbs.checkpoints`: What a checkpoint folder holds, why it is written atomically, and how it is loaded safely: weights from safetensors, states with `torch.load(weights_only=True)`, the network rebuilt from its JSON signature.
- `cxr_diffusion_nbs.classifier`: A small multi-label CNN trained on real radiographs. It is the domain feature extractor behind FID, KID and precision/recall, it checks whether synthetic images show the findings they were asked for, and it is the downstream model whose AUROC tells whether synthetic images help.
- `cxr_diffusion_nbs.cohort`: Turn a trained conditional model into a dataset: target counts per finding (or "balance every finding to the most frequent"), conditions drawn from real patients' labels and lesion masks (jittered in position, size and rotation within where that finding occurs), PNGs (and optionally DICOMs marked synthetic) plus a manifest in the real data's schema with the provenance of every image, and a mixer of real and synthetic images at a chosen ratio.
- `cxr_diffusion_nbs.conditioning`: One denoiser that can be told *which* findings to draw (labels), *where* (a lesion mask) and *how* to describe them (a text prompt), in any combination, with each condition dropped independently during training so that classifier-free guidance can turn each one up or down separately.
- `cxr_diffusion_nbs.downstream`: Train the same classifier on real images only and on real + synthetic images (a sweep over the mixing ratio and the synthetic count, and a "simulated rarity" mode that caps a finding at k real positives), evaluate it on held-out real images with per-finding AUROC, AUPRC, sensitivity and specificity, stratified bootstrap confidence intervals and DeLong's paired test.
- `cxr_diffusion_nbs.ilvr`: Steer a trained sampler with real images, without retraining: at every step the low frequencies of $x_t$ are pulled towards a noised reference (a healthy chest for the anatomy, a real lesion patch for the pathology), each through its own low-pass filter, until its own stop step.
- `cxr_diffusion_nbs.inpainting`: Put a lesion of a chosen finding inside a chosen mask of a real, healthy chest X-ray and leave every pixel outside it as it was, with RePaint resampling (Lugmayr et al., CVPR 2022) on our conditional denoiser.
- `cxr_diffusion_nbs.manifest`: A `Manifest` (an images table, an annotations table and a finding vocabulary) and adapters that read NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, SIIM-ACR, VinDr-CXR, ChestX-Det and the bundled sample into it.
- `cxr_diffusion_nbs.memorisation`: For every synthetic image its nearest real training image, in classifier-feature space and by pixel SSIM; a threshold calibrated on held-out real images that flags near-copies; a check with planted copies; whether the nearest real image is the image whose lesion mask conditioned it; and a figure of the closest pairs.
- `cxr_diffusion_nbs.metrics`: FID and KID in the features of a CXR classifier (torchmetrics), precision / recall / density / coverage, MS-SSIM diversity within a finding, paired SSIM / PSNR and lesion-region SSIM, and a 2-D map of real vs synthetic features, with the inputs checked before anything is computed.
- `cxr_diffusion_nbs.pipeline`: One papermill-parameterised notebook that runs the whole study and writes a run folder: the executed notebook, figures, tables, checkpoints and a report of fidelity, diversity, adherence, memorisation and downstream AUROC (real-only against augmented, with confidence intervals and p-values). Its defaults run on the bundled data on two CPU cores in under 15 minutes; its parameters scale it to a GPU study.
- `cxr_diffusion_nbs.sampling`: The reverse process written out step by step: a diffusers scheduler proposes each move, the conditional denoiser (with a separate classifier-free guidance scale for labels, mask and text) supplies the prediction, and the same seed always gives the same image.
- `cxr_diffusion_nbs.training`: One YAML file describes a run; `train()` runs it on a CPU, a GPU or several processes, and continues exactly where it stopped after a crash or a kill.
- `cxr_diffusion_nbs.turing`: Export a blinded, shuffled reader-study kit of real and synthetic chest X-rays (contact sheet as HTML and PDF, a reader form as CSV) with a separate answer key, then score the returned forms: per-reader accuracy with exact intervals, a binomial test against chance, sensitivity and specificity, and inter-reader agreement (Cohen's and Fleiss' kappa).
- `cxr_diffusion_nbs.unet`: A validated configuration, four presets from "trains in seconds" to "needs a GPU", and the diffusers U-Net and noise scheduler they build, opened up layer by layer."""

__version__ = "0.1.0"

def __getattr__(name):
    "`cxr_diffusion_nbs.load_generator` (from `sampling`), imported on first use so that importing the package stays light."
    if name == 'load_generator':
        from .sampling import load_generator
        return load_generator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
