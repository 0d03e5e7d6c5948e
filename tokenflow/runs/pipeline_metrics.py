"""What the pipeline measures itself (timings, UNet evaluations, memory, reconstruction PSNR): each key's definition.

These numbers are written by the run (:class:`~tokenflow.runs.report.RunReport`) and never recomputed by
``tokenflow-metrics``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PIPELINE_METRICS: dict[str, str] = {
    "unet_evaluations": "image-UNet evaluations in the edit (batch elements summed over calls), inversion excluded",
    "inversion_s": "wall seconds to obtain the inversion (encode + DDIM inversion, or the cache load on a hit)",
    "editing_s": "wall seconds of the denoising loop (keyframe passes, propagation, DDIM steps)",
    "decoding_s": "wall seconds to decode the edited latents with the VAE",
    "reconstruction_s": "wall seconds to DDIM-sample the inversion back and decode it",
    "total_s": "wall seconds of the job, from reading the config to writing the outputs",
    "inversion_cache_hit": "1 when the inversion was loaded from the cache, 0 when computed",
    "peak_rss_mb": "peak resident memory of the process (getrusage ru_maxrss), MiB, model loading included",
    "peak_cuda_mb": "peak CUDA memory allocated by torch (torch.cuda.max_memory_allocated), MiB",
    "estimated_peak_rss_mb": "the preflight estimate of peak resident memory (tokenflow.core.memory), MiB",
    "estimated_peak_cuda_mb": "the preflight estimate of peak CUDA memory (tokenflow.core.memory), MiB",
    "psnr_reconstruction_vs_input": "PSNR (dB, uint8) of the decoded DDIM reconstruction against the input frames",
    "psnr_vae_only_vs_input": "PSNR (dB, uint8) of the VAE-only round trip (encode, decode) against the input frames",
    "psnr_reconstruction_vs_vae_only": "PSNR (dB, uint8) of the DDIM reconstruction against the VAE-only round trip",
    "latent_relative_error": "||reconstructed z0 - encoded z0|| / ||encoded z0|| over all frames",
}


def pipeline_definitions(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Definitions of the keys of ``metrics`` that the pipeline measures itself (see :data:`PIPELINE_METRICS`)."""
    return {k: PIPELINE_METRICS[k] for k in metrics if k in PIPELINE_METRICS}
