"""DDIM (eta = 0) as a :class:`~tokenflow.samplers.base.Sampler`, for every ``prediction_type`` of the SD family.

The arithmetic is :mod:`tokenflow.models.ddim` (the functions the SD path has always used), so the
results are the same bits: equal to diffusers' ``DDIMScheduler.step`` / ``DDIMInverseScheduler.step``.
Levels carry ᾱ; the clean end is the scheduler's ``final_alpha_cumprod`` (ᾱ_0 unless ``set_alpha_to_one``),
which is also where DDIM inversion starts, as in the official TokenFlow code.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from tokenflow.models import ddim
from tokenflow.samplers.base import Grid, NoiseLevel, Sampler


class DDIMSampler(Sampler):
    """Deterministic DDIM on a diffusers (beta-schedule) scheduler's config; guidance form ε."""

    label = "DDIM"
    form = "epsilon"

    def __init__(self, scheduler: Any) -> None:
        ddim.check_scheduler(scheduler)
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.clip = ddim.clip_range(scheduler)

    def level(self, timestep: int) -> NoiseLevel:
        return NoiseLevel(int(timestep), ddim.alpha_bar(self.scheduler, int(timestep)))

    @property
    def clean_end(self) -> NoiseLevel:
        return NoiseLevel(None, float(self.scheduler.final_alpha_cumprod))

    def grid(self, n_steps: int, image_seq_len: int | None = None) -> Grid:
        return Grid(tuple(self.level(t) for t in ddim.ddim_timesteps(self.scheduler, n_steps)), self.clean_end)

    def path(self, timesteps: list) -> Grid:
        return Grid(tuple(self.level(t) for t in timesteps), self.clean_end)

    def to_form(self, output: Tensor, x: Tensor, level: NoiseLevel) -> Tensor:
        return ddim.to_epsilon(output, x, level.value, self.prediction_type)

    def step(self, x: Tensor, prediction: Tensor, source: NoiseLevel, target: NoiseLevel) -> Tensor:
        return ddim.ddim_step(x, prediction, source.value, target.value, self.clip)

    def add_noise(self, clean: Tensor, noise: Tensor, level: NoiseLevel) -> Tensor:
        a = level.value
        return a**0.5 * clean + (1 - a) ** 0.5 * noise

    def noise_from_latent(self, clean: Tensor, noisy: Tensor, level: NoiseLevel) -> Tensor:
        a = level.value
        return (noisy - a**0.5 * clean) / (1 - a) ** 0.5

    def settings(self) -> dict[str, Any]:
        cfg = self.scheduler.config
        return {"sampler": "ddim", "prediction_type": self.prediction_type, "clip": self.clip,
                **{k: cfg.get(k) for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                           "steps_offset", "timestep_spacing", "set_alpha_to_one")}}
