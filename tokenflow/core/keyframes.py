"""Which frames are keyframes at each denoising step.

Schedules are computed up front for the whole run (a list of keyframe indices per step), from a
dedicated ``torch.Generator``, so a run is reproducible and the draw can be logged and tested.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum

import torch

from tokenflow.errors import ConfigError
from tokenflow.options import choice


class Formula(str, Enum):
    default = "default"       # one uniform draw per chunk, a last shorter chunk included
    reference = "reference"   # the official torch.randint(stride, (n // stride,)) + arange(0, n, stride)


class KeyframeSchedule(ABC):
    @abstractmethod
    def sequence(self, n_steps: int, n_frames: int) -> list[list[int]]:
        """Sorted keyframe indices for each of ``n_steps`` steps of an ``n_frames`` video."""


class RandomKeyframes(KeyframeSchedule):
    """One keyframe drawn uniformly per chunk of ``stride`` frames, redrawn at every step (the paper's scheme).

    ``formula="reference"`` reproduces the official draw exactly: ``torch.randint(stride, (n // stride,)) +
    arange(0, n, stride)`` per step from a generator seeded with ``seed`` (it needs ``n`` to be a multiple
    of ``stride``). The default also covers a last, shorter chunk.
    """

    def __init__(self, stride: int = 8, seed: int = 0, formula: Formula | str = Formula.default) -> None:
        if stride < 1:
            raise ConfigError(f"keyframe stride={stride} must be >= 1 — use e.g. 8")
        self.stride, self.seed, self.formula = stride, seed, choice(Formula, formula, "keyframes.formula")

    def sequence(self, n_steps: int, n_frames: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        starts = torch.arange(0, n_frames, self.stride)
        out = []
        for _ in range(n_steps):
            if self.formula == "reference":
                if n_frames % self.stride:
                    raise ConfigError(f"the reference keyframe draw needs n_frames ({n_frames}) to be a multiple of "
                                      f"the stride ({self.stride}) — round n_frames down, as the official code does")
                idx = torch.randint(self.stride, (n_frames // self.stride,), generator=g) + starts
            else:
                lengths = (n_frames - starts).clamp(max=self.stride)
                idx = starts + (torch.rand(len(starts), generator=g) * lengths).long()
            out.append(idx.tolist())
        return out


class FixedKeyframes(KeyframeSchedule):
    """The same keyframes at every step (e.g. for ablations and exact tests)."""

    def __init__(self, indices: list[int]) -> None:
        if not indices:
            raise ConfigError("fixed keyframes need at least one index — e.g. keyframes.indices=[0,8]")
        self.indices = sorted(int(i) for i in indices)

    def sequence(self, n_steps: int, n_frames: int) -> list[list[int]]:
        bad = [i for i in self.indices if not 0 <= i < n_frames]
        if bad:
            raise ConfigError(f"keyframe indices {bad} are outside the video's {n_frames} frames — use 0..{n_frames - 1}")
        return [list(self.indices) for _ in range(n_steps)]
