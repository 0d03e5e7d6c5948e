"""Flow-matching Euler (SD 3 / 3.5, FLUX.1) as a :class:`~tokenflow.samplers.base.Sampler`; guidance form: velocity.

Latents at noise level σ are x_σ = (1 - σ)·x_0 + σ·ε and the model predicts the velocity v = ε - x_0, so
one Euler step is x_σ' = x_σ + (σ' - σ)·v, read forwards for sampling and backwards for Euler-ODE
inversion. The σ grid is the one diffusers' ``FlowMatchEulerDiscreteScheduler`` computes from the
checkpoint's scheduler config (shift, resolution-dependent dynamic shifting with μ from the image's token
count as the SD 3 / FLUX pipelines derive it, terminal stretching, Karras/exponential/beta spacing): the
scheduler itself is asked, on a copy, so every config option means what it means there. The step is done
in float32 exactly as the scheduler's (``dt`` a float32 difference of float32 σs).

Pipelines space the unshifted σs differently, and the sampler follows the backbone's pipeline
(``spacing``): ``"scheduler"`` — the scheduler's own ``set_timesteps(n)``, n timesteps evenly from σ_max·T to
σ_min·T (``StableDiffusion3Pipeline``); ``"linear"`` — σ = linspace(1, 1/n, n) handed to ``set_timesteps``
as custom sigmas, then shifted (``FluxPipeline``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.samplers.base import Grid, NoiseLevel, Sampler


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """μ of resolution-dependent shifting: linear in the image's token count (diffusers' SD 3 / FLUX pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


class FlowMatchEulerSampler(Sampler):
    """Deterministic Euler on a ``FlowMatchEulerDiscreteScheduler`` config (velocity prediction)."""

    label = "flow-matching Euler"
    form = "velocity"

    SPACINGS = ("scheduler", "linear")

    def __init__(self, scheduler: Any, spacing: str = "scheduler") -> None:
        if spacing not in self.SPACINGS:
            raise ConfigError(f"σ spacing {spacing!r} is unknown — use one of {', '.join(self.SPACINGS)}")
        self.spacing = spacing
        cfg = scheduler.config
        if cfg.get("stochastic_sampling", False):
            raise ModelLoadError("scheduler stochastic_sampling=True adds fresh noise at every step and cannot be "
                                 "inverted — set it to false in scheduler_config.json")
        if cfg.get("invert_sigmas", False):
            raise ModelLoadError("scheduler invert_sigmas=True (Mochi's reversed schedule) is not supported — use a "
                                 "checkpoint whose schedule runs from σ=1 to σ=0")
        self.config = dict(cfg)
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))

    def _scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.config)  # a fresh copy: never the model's

    @property
    def config_depends_on_size(self) -> bool:
        return bool(self.config.get("use_dynamic_shifting", False))

    def mu(self, image_seq_len: int | None) -> float | None:
        """μ for dynamic shifting (None when the config shifts by a constant)."""
        if not self.config.get("use_dynamic_shifting", False):
            return None
        if image_seq_len is None:
            raise ConfigError("this flow-matching schedule shifts with the image size (use_dynamic_shifting) — "
                              "pass image_seq_len, the number of image tokens per frame")
        return calculate_shift(image_seq_len, self.config.get("base_image_seq_len", 256),
                               self.config.get("max_image_seq_len", 4096), self.config.get("base_shift", 0.5),
                               self.config.get("max_shift", 1.15))

    def grid(self, n_steps: int, image_seq_len: int | None = None) -> Grid:
        if not 1 <= n_steps <= self.num_train_timesteps:
            raise ConfigError(f"{n_steps} flow-matching steps on a model trained with {self.num_train_timesteps} "
                              f"timesteps — use n_steps (and inverter.n_steps) between 1 and {self.num_train_timesteps}")
        scheduler = self._scheduler()
        mu = self.mu(image_seq_len)
        extra: dict[str, Any] = {} if mu is None else {"mu": mu}
        if self.spacing == "linear":  # FluxPipeline: sigmas = np.linspace(1.0, 1 / n, n), shifted by the scheduler
            extra["sigmas"] = np.linspace(1.0, 1 / n_steps, n_steps)
        scheduler.set_timesteps(n_steps, **extra)
        sigmas = [float(s) for s in scheduler.sigmas]
        timesteps = [float(t) for t in scheduler.timesteps]
        if not all(math.isfinite(v) for v in sigmas + timesteps):
            raise ConfigError(f"the scheduler's σ schedule for {n_steps} steps is not finite (shift_terminal="
                              f"{self.config.get('shift_terminal')} needs at least 2 steps) — use more steps")
        levels = tuple(NoiseLevel(t, s) for t, s in zip(timesteps, sigmas[:-1]))
        return Grid(levels, NoiseLevel(None, sigmas[-1]))

    def level(self, timestep: int | float) -> NoiseLevel:
        """The level of a timestep t = σ·T (σ recovered as t / T: within float32 rounding of the grid's own σ)."""
        return NoiseLevel(float(timestep), float(timestep) / self.num_train_timesteps)

    def to_form(self, output: Tensor, x: Tensor, level: NoiseLevel) -> Tensor:
        return output.float()

    def step(self, x: Tensor, prediction: Tensor, source: NoiseLevel, target: NoiseLevel) -> Tensor:
        dt = torch.tensor(target.value, dtype=torch.float32) - torch.tensor(source.value, dtype=torch.float32)
        return x.float() + dt.to(prediction.device) * prediction.float()

    def add_noise(self, clean: Tensor, noise: Tensor, level: NoiseLevel) -> Tensor:
        return level.value * noise.float() + (1.0 - level.value) * clean.float()

    def noise_from_latent(self, clean: Tensor, noisy: Tensor, level: NoiseLevel) -> Tensor:
        if level.value <= 0:
            raise ConfigError("the noise of a clean latent (σ = 0) is undefined — re-noise at a level above the clean end")
        return (noisy.float() - (1.0 - level.value) * clean.float()) / level.value

    def settings(self) -> dict[str, Any]:
        keep = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                "max_image_seq_len", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "time_shift_type")
        return {"sampler": "flow_match_euler", "spacing": self.spacing, **{k: self.config.get(k) for k in keep}}
