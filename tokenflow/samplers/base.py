"""The sampler interface: a grid of noise levels, one step along the sampling ODE, and the form editors guide in.

A backbone predicts; a sampler steps. A :class:`Sampler` turns a diffusers scheduler config into a
:class:`Grid` of :class:`NoiseLevel` s (noisiest first, with an explicit clean end: no ``-1`` sentinel),
converts a model's raw output into its *guidance form* (``epsilon`` for DDIM, ``velocity`` for flow
matching: the quantity classifier-free guidance and editors combine), and moves latents between two
levels in either direction (sampling one way, inversion the other), always in float32.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from tokenflow.errors import ConfigError

Form = Literal["epsilon", "velocity"]


@dataclass(frozen=True)
class NoiseLevel:
    """One point of a sampling path.

    ``timestep``: what the model is conditioned on (DDIM: the integer training timestep; flow matching:
    σ·num_train_timesteps), None at the clean end, where the model is never evaluated. ``value``: the
    sampler's own measure of the noise (DDIM: ᾱ; flow matching: σ).
    """

    timestep: int | float | None
    value: float

    @property
    def is_clean_end(self) -> bool:
        return self.timestep is None


@dataclass(frozen=True)
class Grid:
    """The levels a run visits, noisiest first, and the clean level after the last (``end``).

    ``timesteps`` are the model timesteps of ``levels`` (the keys of an inversion's trajectory).
    ``grid[i:]`` is the same path entered part-way (SDEdit), with the same ``end``.
    """

    levels: tuple[NoiseLevel, ...]
    end: NoiseLevel

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, index: int | slice) -> "NoiseLevel | Grid":
        if isinstance(index, slice):
            if index.step not in (None, 1):
                raise ValueError("a grid is sliced contiguously (no step): it is a path")
            return Grid(self.levels[index], self.end)
        return self.levels[index]

    @property
    def timesteps(self) -> list:
        return [level.timestep for level in self.levels]

    def after(self, i: int) -> NoiseLevel:
        """The level a sampling step from ``levels[i]`` lands on: the next one, or ``end`` after the last."""
        return self.levels[i + 1] if i + 1 < len(self.levels) else self.end

    def level_of(self, timestep: int | float) -> NoiseLevel:
        for level in self.levels:
            if level.timestep == timestep:
                return level
        raise KeyError(f"timestep {timestep} is not on this grid")


class Sampler(ABC):
    """Steps latents along a model's sampling ODE; see the module docstring."""

    #: how logs and messages name it
    label: str
    #: the quantity guidance combines and :meth:`step` consumes
    form: Form

    @abstractmethod
    def grid(self, n_steps: int, image_seq_len: int | None = None) -> Grid:
        """The ``n_steps`` sampling grid, noisiest first (``image_seq_len``: tokens per image, for resolution-
        dependent schedules)."""

    @abstractmethod
    def level(self, timestep: int | float) -> NoiseLevel:
        """The level of a model timestep (e.g. one an inversion kept)."""

    def path(self, timesteps: list) -> Grid:
        """A :class:`Grid` through the given model timesteps (noisiest first), ending at the clean end."""
        raise ConfigError(f"{type(self).__name__} builds its levels from its own grid — pass sampler.grid(n_steps) "
                          "(or a slice of it), not a list of timesteps")

    @abstractmethod
    def to_form(self, output: Tensor, x: Tensor, level: NoiseLevel) -> Tensor:
        """A model's raw ``output`` for latents ``x`` at ``level`` in this sampler's guidance form, float32."""

    @abstractmethod
    def step(self, x: Tensor, prediction: Tensor, source: NoiseLevel, target: NoiseLevel) -> Tensor:
        """``x`` moved from ``source`` to ``target`` (either direction) with ``prediction`` in the guidance form."""

    @abstractmethod
    def add_noise(self, clean: Tensor, noise: Tensor, level: NoiseLevel) -> Tensor:
        """The forward process: clean latents noised to ``level`` with the given noise."""

    @abstractmethod
    def noise_from_latent(self, clean: Tensor, noisy: Tensor, level: NoiseLevel) -> Tensor:
        """The noise for which ``add_noise(clean, noise, level) == noisy``."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes what the sampler computes (part of the inversion cache key)."""

    @property
    def config_depends_on_size(self) -> bool:
        """Whether :meth:`grid` depends on ``image_seq_len`` (resolution-dependent shifting)."""
        return False

    @property
    def name(self) -> str:
        return str(self.settings()["sampler"])
