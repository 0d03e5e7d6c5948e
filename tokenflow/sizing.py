"""How large a run's clip is: the frame size it is read at, and the frame count cut to whole keyframe chunks."""
from __future__ import annotations

import dataclasses
from typing import TypeVar

from tokenflow.errors import ConfigError, VideoError

V = TypeVar("V")  # a tokenflow.storage.video.Video (a dataclass with ``frames`` and ``n_frames``)


def target_size(src_h: int, src_w: int, height: int | None, width: int | None, short_side: int = 512) -> tuple[int, int]:
    """Output (h, w) for a (src_h, src_w) source.

    Both given: exactly (height, width). One given: the other keeps the aspect ratio, rounded to the
    nearest multiple of 64 (min 64). Neither: the short side becomes ``short_side`` and the long side
    is the aspect-preserving value rounded the same way.
    """
    check_sizes(height, width, short_side)
    if src_h < 1 or src_w < 1:
        raise VideoError(f"source frames are {src_h}x{src_w} — the video has no pixels")
    if height is not None and width is not None:
        return height, width
    if height is not None:
        return height, _round64(src_w * height / src_h)
    if width is not None:
        return _round64(src_h * width / src_w), width
    if src_h <= src_w:
        return short_side, _round64(src_w * short_side / src_h)
    return _round64(src_h * short_side / src_w), short_side


def round_frames_down(video: V, multiple: int) -> V:
    """The first ``n_frames - n_frames % multiple`` frames (what the official TokenFlow code edits)."""
    keep = video.n_frames - video.n_frames % multiple
    if keep == 0:
        raise ConfigError(f"rounding {video.n_frames} frames down to a multiple of {multiple} leaves none — "
                          "lower keyframe_stride or read more frames")
    return video if keep == video.n_frames else dataclasses.replace(video, frames=video.frames[:keep])


def check_sizes(height: int | None, width: int | None, short_side: int) -> None:
    """A ConfigError unless each size that is given is a multiple of 64 (the latents' grid needs it)."""
    for name, value in (("height", height), ("width", width), ("short_side", short_side)):
        if value is not None and (value < 64 or value % 64):
            lo, hi = max(64, (value // 64) * 64), max(128, -(-value // 64) * 64)
            raise ConfigError(f"{name}={value} is not a multiple of 64 — use e.g. {lo} or {hi}")


def _round64(x: float) -> int:
    return max(64, int(round(x / 64.0)) * 64)
