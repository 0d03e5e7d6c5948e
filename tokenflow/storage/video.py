"""The decoded clip, :class:`Video`, and :func:`read_video`, which reads one with the decoder that fits.

Frames are always ``np.ndarray`` of shape (N, H, W, 3), dtype uint8, RGB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenflow.errors import ConfigError
from tokenflow.sizing import check_sizes
from tokenflow.storage.decoders import BACKENDS, check_selection, decode
from tokenflow.storage.frames import check_fps, check_frames

__all__ = ["Video", "frames_from_tensor", "read_video"]


@dataclass
class Video:
    """A decoded clip: ``frames`` (N, H, W, 3) uint8 RGB, ``fps`` and the ``source`` it came from."""

    frames: np.ndarray
    fps: float
    source: str = ""

    def __post_init__(self) -> None:
        check_frames(self.frames, "Video.frames")
        self.fps = check_fps(self.fps, "Video.fps")

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    def to_tensor(self, frames: slice | None = None) -> torch.Tensor:
        """Frames (or a ``slice`` of them) as float32 (N, 3, H, W) in [-1, 1] (CPU; move it with ``.to(device)``)."""
        x = torch.from_numpy(np.ascontiguousarray(self.frames if frames is None else self.frames[frames]))
        x = x.permute(0, 3, 1, 2)
        return x.float().div(127.5).sub(1.0)

    @classmethod
    def from_tensor(cls, x: torch.Tensor, fps: float, source: str = "tensor") -> Video:
        """Inverse of :meth:`to_tensor` for a (N, 3, H, W) tensor in [-1, 1]."""
        return cls(frames_from_tensor(x), fps=fps, source=source)



def frames_from_tensor(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] (clamped) -> (N, H, W, 3) uint8, rounding to nearest."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"expected a (N, 3, H, W) tensor, got shape {tuple(x.shape)} — add a batch dim or permute channels first")
    y = (x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return y.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()



def read_video(
    path: str | os.PathLike, n_frames: int | None = None, stride: int = 1, start: int = 0,
    height: int | None = None, width: int | None = None, short_side: int = 512,
    *, backend: str = "auto", fps: float = 10.0, native: bool = False,
) -> Video:
    """Read frames ``start, start + stride, ...`` (the first ``n_frames``; None = all) and resize.

    ``path`` is a video file or a folder of png/jpg/jpeg frames (sorted by name; ``fps`` applies to
    folders, and to files that carry no frame rate). ``backend``: "decord", "pyav" or "auto" (decord
    if importable, else PyAV). Returns frames (N, H, W, 3) uint8, sized by :func:`~tokenflow.sizing.target_size`;
    ``native``: at the size they were stored at (any size: for reading results and masks, not for editing).
    """
    check_selection(n_frames, stride, start)
    if native and (height is not None or width is not None):
        raise ConfigError(f"read_video(native=True) keeps the stored size; height={height}, width={width} resize — "
                          "give one or the other")
    check_sizes(height, width, short_side)
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is unknown — use one of {', '.join(BACKENDS)}")
    check_fps(fps, "fps")
    size = None if native else (height, width, short_side)
    frames, rate = decode(path, n_frames, stride, start, size, backend, fps)
    return Video(frames=frames, fps=float(rate), source=str(Path(path)))
