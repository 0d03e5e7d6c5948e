"""Which frames are keyframes at each denoising step.

Schedules are computed up front for the whole run (a list of keyframe indices per step), from a
dedicated ``torch.Generator``, so a run is reproducible and the draw can be logged and tested.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any

import torch

from tokenflow.errors import ConfigError
from tokenflow.options import choice
from tokenflow.rng import seeded


class Formula(str, Enum):
    default = "default"       # one uniform draw per chunk, a last shorter chunk included
    reference = "reference"   # the official torch.randint(stride, (n // stride,)) + arange(0, n, stride)


class KeyframeSchedule(ABC):
    def reads_features(self, n_frames: int) -> bool:
        """Whether the schedule of an ``n_frames`` video reads the source video's features: the pipeline then
        passes ``features=`` (N, h, w, C) to :meth:`sequence`. Default: no."""
        return False

    @abstractmethod
    def sequence(self, n_steps: int, n_frames: int) -> list[list[int]]:
        """Sorted keyframe indices for each of ``n_steps`` steps of an ``n_frames`` video."""

    def bound(self, n_steps: int, n_frames: int) -> int:
        """The most keyframes a step will have (the memory preflight's count)."""
        return max((len(k) for k in self.sequence(n_steps, n_frames)), default=0)


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
        g = seeded(self.seed)
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


class AdaptiveKeyframes(KeyframeSchedule):
    """AdaFlow's adaptive keyframes: the video cut into clips where its content changes
    (:func:`tokenflow.core.clips.adaptive_clips`, on the source video's tokens at ``layer``), one keyframe drawn
    uniformly per clip at every step (AdaFlow: Python's ``random.randint`` after seeding; here a
    ``random.Random(seed)`` of its own, drawn clip by clip, step by step, in the same order).

    The pipeline reads the features (:func:`tokenflow.core.clips.frame_features`) and passes them to
    :meth:`sequence`; :meth:`clips` gives the cut alone (e.g. to look at it in a notebook).
    """

    def reads_features(self, n_frames: int) -> bool:
        return True

    def __init__(self, mean_threshold: float = 0.75, region_threshold: float = 0.6, max_clip: int = 400,
                 seed: int = 0, layer: str | None = None, formula: str = "default", features: str = "source",
                 dift_block: int = 2, dift_t: int = 0, dift_ensemble: int = 8, dift_encode: str = "mean") -> None:
        from tokenflow.core.clips import ClipFormula, DiftEncoding, FeatureSource

        for name, value in (("mean_threshold", mean_threshold), ("region_threshold", region_threshold)):
            if not -1.0 <= float(value) <= 1.0:
                raise ConfigError(f"keyframes.{name}={value} must be a cosine similarity in [-1, 1] — AdaFlow uses "
                                  "0.75 (mean) and 0.6 (region)")
        if int(max_clip) < 1:
            raise ConfigError(f"keyframes.max_clip={max_clip} must be >= 1 — AdaFlow's is 400 frames")
        self.mean_threshold, self.region_threshold = float(mean_threshold), float(region_threshold)
        self.max_clip, self.seed, self.layer = int(max_clip), int(seed), layer
        self.formula = choice(ClipFormula, formula, "keyframes.formula")
        self.features = choice(FeatureSource, features, "keyframes.features")
        if int(dift_ensemble) < 1 or not 0 <= int(dift_t) < 1000:
            raise ConfigError(f"keyframes.dift_ensemble={dift_ensemble} must be >= 1 and keyframes.dift_t={dift_t} in "
                              "[0, 999] — AdaFlow uses 8 and 0")
        self.dift_block, self.dift_t, self.dift_ensemble = int(dift_block), int(dift_t), int(dift_ensemble)
        self.dift_encode = choice(DiftEncoding, dift_encode, "keyframes.dift_encode")

    def frame_features(self, model: Any, clean: torch.Tensor, timestep: Any, prompt: str, batch: int = 8,
                       frames: Any = None) -> torch.Tensor:
        """The features this schedule cuts on, (N, h, w, C), for clean latents (N, C, h, w): the source tokens at
        :attr:`layer` (the model's default layer when None) for ``prompt`` at ``timestep``, or DIFT features
        (``dift_encode=reference`` reads the input ``frames`` (N, H, W, 3) uint8 instead of the latents)."""
        from tokenflow.core.clips import FeatureSource, default_feature_layer, dift_features, frame_features
        from tokenflow.core.inversion import image_conditioning

        if self.features is FeatureSource.dift:
            return dift_features(model, clean, self.dift_block, self.dift_t, self.dift_ensemble, self.seed, batch,
                                 self.dift_encode, frames)
        layer = self.layer or default_feature_layer(model.layout())
        return frame_features(model, clean, timestep, model.encode_text(prompt), layer, batch,
                              image_conditioning(model, clean))

    def clips(self, features: torch.Tensor) -> list[int]:
        """First frame of each clip of a video with ``features`` (N, h, w, C)."""
        from tokenflow.core.clips import adaptive_clips

        return adaptive_clips(features, self.mean_threshold, self.region_threshold, self.max_clip, self.formula)

    def sequence(self, n_steps: int, n_frames: int, features: torch.Tensor | None = None,
                 clips: list[int] | None = None) -> list[list[int]]:
        """One keyframe per clip and step; the clips are cut from ``features``, or given (``clips``: their first
        frames, as :meth:`clips` returns them for these features)."""
        import random

        if clips is not None:
            starts = list(clips)
        elif features is None:
            raise ConfigError("adaptive keyframes cut the video from its features — pass features= (the pipeline "
                              "does; tokenflow.core.clips.frame_features computes them)")
        elif features.shape[0] != n_frames:
            raise ValueError(f"features for {features.shape[0]} frames, the video has {n_frames}")
        else:
            starts = self.clips(features)
        ends = starts[1:] + [n_frames]
        rng = random.Random(self.seed)
        return [[rng.randint(a, b - 1) for a, b in zip(starts, ends)] for _ in range(n_steps)]

    def bound(self, n_steps: int, n_frames: int) -> int:
        """Keyframes per step before the features are known, for the memory preflight: one per ``max_clip``
        frames at least; assumed one per 8 frames (the random schedule's density) — the cut is data-dependent."""
        return max(1, math.ceil(n_frames / min(8, self.max_clip)))


class AutoKeyframes(KeyframeSchedule):
    """The default: the paper's random keyframes (one per ``stride`` frames) while they number at most
    ``max_keyframes`` (160 frames at stride 8, 20 keyframes: every clip the official code edits), AdaFlow's
    adaptive keyframes (one per clip, :class:`AdaptiveKeyframes`) on longer videos, where the paper's K = N/8
    keyframes edited in one call would grow without bound."""

    def __init__(self, stride: int = 8, seed: int = 0, max_keyframes: int = 20, mean_threshold: float = 0.75,
                 region_threshold: float = 0.6, max_clip: int = 400, layer: str | None = None,
                 features: str = "source") -> None:
        if int(max_keyframes) < 1:
            raise ConfigError(f"keyframes.max_keyframes={max_keyframes} must be >= 1 — e.g. 20 (AdaFlow's max_kv_size)")
        self.random = RandomKeyframes(stride, seed)
        self.adaptive = AdaptiveKeyframes(mean_threshold, region_threshold, max_clip, seed, layer, features=features)
        self.max_keyframes = int(max_keyframes)
        self.layer = layer

    def _adaptive(self, n_frames: int) -> bool:
        return math.ceil(n_frames / self.random.stride) > self.max_keyframes

    def reads_features(self, n_frames: int) -> bool:
        return self._adaptive(n_frames)

    def clips(self, features: torch.Tensor) -> list[int]:
        return self.adaptive.clips(features)

    def frame_features(self, model: Any, clean: torch.Tensor, timestep: Any, prompt: str, batch: int = 8,
                       frames: Any = None) -> torch.Tensor:
        return self.adaptive.frame_features(model, clean, timestep, prompt, batch, frames)

    def sequence(self, n_steps: int, n_frames: int, features: torch.Tensor | None = None,
                 clips: list[int] | None = None) -> list[list[int]]:
        if self._adaptive(n_frames):
            return self.adaptive.sequence(n_steps, n_frames, features, clips)
        return self.random.sequence(n_steps, n_frames)

    def bound(self, n_steps: int, n_frames: int) -> int:
        return self.adaptive.bound(n_steps, n_frames) if self._adaptive(n_frames) else self.random.bound(n_steps, n_frames)
