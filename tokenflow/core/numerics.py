"""Stop a run whose latents stop being numbers: one line naming the stage, the step and the likely cause.

Checked once per denoising (and inversion) step on the whole latent tensor — one reduction, far cheaper
than the UNet call it follows — so a diverging edit (a huge guidance weight, an fp16 overflow, NaN
weights) fails at the step it breaks instead of publishing black frames with status ok.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenflow.errors import ConfigError, NonFiniteError

#: a guidance weight beyond this is named as the likely cause of non-finite latents (usual values: 1-20)
LARGE_GUIDANCE = 100.0


def check_finite_setting(value: float, name: str) -> float:
    """``value`` as a float, or a ConfigError when it is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} is not a finite number — give a real value (e.g. 7.5)")
    return value


def check_latents(x: Tensor, stage: str, step: int, n_steps: int, timestep: int, cause: str) -> None:
    """Raise :class:`NonFiniteError` when ``x`` holds NaN or inf after ``step`` (0-based) of ``n_steps``."""
    if bool(torch.isfinite(x).all()):
        return
    bad = int((~torch.isfinite(x)).sum())
    raise NonFiniteError(f"the {stage} produced non-finite latents ({bad} of {x.numel()} values NaN/inf) at step "
                         f"{step + 1} of {n_steps} (t={timestep}) — {cause}")


def likely_cause(dtype: torch.dtype, guidance_scale: float | None = None) -> str:
    """The most likely reason for non-finite latents, phrased as the fix."""
    if guidance_scale is not None and abs(guidance_scale) > LARGE_GUIDANCE:
        return (f"the guidance weight {guidance_scale:g} is far outside the usual 1-20: lower editor.guidance_scale")
    if dtype == torch.float16:
        return "float16 overflowed in the model: run with dtype=bfloat16 or dtype=float32"
    return "the model's weights or the inputs hold NaN/inf: check the checkpoint (and any LoRA) and the input frames"
