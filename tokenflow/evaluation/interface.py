"""The metric interface: a :class:`VideoMetric` scores an edit against its source, a :class:`MetricSuite` runs a
named set of them into :class:`Scores`.

Keys carry the backend that produced them (``warp_error@opencv-farneback``, ``clip_text_alignment@clip-vit-base-patch32``)
so numbers of different definitions never share a column; :attr:`VideoMetric.definitions` says exactly what each means.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenflow.errors import ConfigError, VideoError
from tokenflow.evaluation.metrics import as_frames, as_masks


class VideoMetric(ABC):
    """One family of video metrics. ``compute`` returns ``{key: value}`` (a key may be left out when it
    cannot be measured, e.g. temporal metrics of a one-frame clip, background metrics without masks);
    :attr:`definitions` maps every key it can write to its exact definition (written to metrics.json)."""

    name: str = ""  # short family name, the key of this metric in a MetricSuite config

    @property
    def meaningless(self) -> bool:
        """True when the values only exercise the plumbing (random-weight test models)."""
        return False

    @property
    @abstractmethod
    def definitions(self) -> dict[str, str]:
        """Every key :meth:`compute` can return, with its exact definition."""

    @abstractmethod
    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        """Score ``edited`` against ``source``: (N, H, W, 3) uint8 frames (or Videos) of the same shape.

        ``prompt``: the target prompt; ``masks``: object masks (N, H, W) or (H, W), True = the edited object.
        """


@dataclass
class Scores:
    """The result of :meth:`MetricSuite.evaluate`: values, their definitions and which are meaningless."""

    values: dict[str, float]
    definitions: dict[str, str]
    meaningless: list[str] = field(default_factory=list)
    withheld: str | None = None  # why no value is reported (a degenerate edit, e.g. every frame one flat colour)

    def merge_into(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add these scores to a metrics.json record in place (``metrics``, ``definitions`` and, when any are
        meaningless, ``info.meaningless_metrics``); returns the record."""
        record.setdefault("metrics", {}).update(self.values)
        record.setdefault("definitions", {}).update(self.definitions)
        if self.meaningless or self.withheld:
            info = record.setdefault("info", {}) or {}
            if self.meaningless:
                info["meaningless_metrics"] = sorted(set(info.get("meaningless_metrics", [])) | set(self.meaningless))
            if self.withheld:
                info["metrics_withheld"] = self.withheld
            record["info"] = info
        return record


class MetricSuite:
    """A named set of metrics (the ``metrics`` config group): ``MetricSuite(warp=WarpErrorMetric(), ...)``."""

    def __init__(self, **metrics: VideoMetric) -> None:
        bad = [k for k, m in metrics.items() if not isinstance(m, VideoMetric)]
        if bad:
            raise ConfigError(f"metrics.{bad[0]} is a {type(metrics[bad[0]]).__name__}, not a VideoMetric — give it a "
                              "_target_ such as tokenflow.evaluation.weight_free.WarpErrorMetric")
        self.metrics: dict[str, VideoMetric] = dict(metrics)

    def definitions(self) -> dict[str, str]:
        return {k: v for m in self.metrics.values() for k, v in m.definitions.items()}

    def evaluate(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> Scores:
        """Run every metric on the same frames; see :meth:`VideoMetric.compute` for the arguments."""
        ed, src = as_frames(edited, "edited"), as_frames(source, "source")
        if ed.shape != src.shape:
            raise VideoError(f"edited frames {ed.shape} and source frames {src.shape} differ in shape — score the edit "
                             "at the source's size and length")
        m = None if masks is None else as_masks(masks, src.shape[0], src.shape[1:3])
        if self.metrics and flat_frames(ed):  # consistency metrics would call it perfect: report nothing
            return Scores({}, {}, withheld="every edited frame is a single flat colour (a degenerate edit): no metric "
                                           "is meaningful on it")
        values: dict[str, float] = {}
        definitions: dict[str, str] = {}
        meaningless: list[str] = []
        for metric in self.metrics.values():
            out = metric.compute(ed, src, prompt, m)
            values.update({k: float(v) for k, v in out.items()})
            definitions.update({k: metric.definitions[k] for k in out})
            if metric.meaningless:
                meaningless += list(out)
        return Scores(values, definitions, meaningless)


def flat_frames(frames: np.ndarray) -> bool:
    """Whether every frame of (N, H, W, 3) uint8 ``frames`` is one flat colour (e.g. the black frames of a NaN edit)."""
    pixels = frames.reshape(frames.shape[0], -1, frames.shape[-1])
    return bool((pixels.max(axis=1) == pixels.min(axis=1)).all())
