"""Samplers: the grid of noise levels and the step along the sampling ODE (DDIM, flow-matching Euler)."""
from __future__ import annotations

from typing import Any

from tokenflow.errors import ModelLoadError
from tokenflow.samplers.base import Form, Grid, NoiseLevel, Sampler
from tokenflow.samplers.ddim import DDIMSampler
from tokenflow.samplers.flow_match import FlowMatchEulerSampler, calculate_shift

def sampler_for(scheduler: Any, spacing: str | None = None) -> Sampler:
    """The sampler a checkpoint's scheduler implies: flow-matching Euler on the σ schedule of any ``FlowMatch*``
    scheduler's config (``spacing``: how the backbone's pipeline spaces σ, see
    :class:`~tokenflow.samplers.flow_match.FlowMatchEulerSampler`), DDIM for the beta-schedule (SD 1.x/2.x/XL) family."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return FlowMatchEulerSampler(scheduler, spacing or "scheduler")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ModelLoadError(f"scheduler {name} has neither a beta schedule (alphas_cumprod) nor a flow-matching σ "
                             "schedule — use the checkpoint's DDIM/PNDM or FlowMatchEuler scheduler")
    return DDIMSampler(scheduler)


def model_sampler(model: Any) -> Sampler:
    """The sampler of a backbone: its scheduler's, spaced as the backbone's pipeline spaces σ (``sigma_spacing``)."""
    return sampler_for(model.scheduler, getattr(model, "sigma_spacing", None))


__all__ = ["DDIMSampler", "FlowMatchEulerSampler", "Form", "Grid", "NoiseLevel", "Sampler", "calculate_shift",
           "model_sampler", "sampler_for"]
