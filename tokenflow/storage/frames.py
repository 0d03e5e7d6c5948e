"""The frames storage reads and writes: (N, H, W, 3) uint8 RGB arrays at a positive, finite frame rate."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tokenflow.errors import ConfigError, VideoError


def check_frames(frames: np.ndarray, name: str) -> None:
    """A VideoError naming ``name`` unless ``frames`` is a (N, H, W, 3) uint8 array with N >= 1."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        got = f"shape {getattr(frames, 'shape', None)} dtype {getattr(frames, 'dtype', type(frames).__name__)}"
        raise VideoError(f"{name} must be a (N, H, W, 3) uint8 array, got {got} — convert with frames_from_tensor or .astype(np.uint8)")
    if frames.shape[0] < 1:
        raise VideoError(f"{name} has 0 frames — pass at least one frame")


def check_fps(fps: Any, name: str) -> float:
    """``fps`` as a float, or a ConfigError when it is not a positive finite number of frames per second."""
    try:
        value = float(fps)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={fps} is not a frame rate — give a positive number of frames per second "
                          "(the source clip's, e.g. 30.0)")
    return value
