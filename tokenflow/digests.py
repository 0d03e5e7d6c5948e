"""Content keys: sha256 hex digests of what a cache entry or a built folder depends on."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def text_digest(text: str, length: int = 64) -> str:
    """The first ``length`` hex digits of the sha256 of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def json_digest(data: Any, length: int = 64) -> str:
    """:func:`text_digest` of ``data`` as JSON with sorted keys (values JSON cannot hold by their ``str``)."""
    return text_digest(json.dumps(data, sort_keys=True, default=str), length)


def frames_fingerprint(frames: np.ndarray, fps: float | None = None) -> str:
    """sha256 hex digest of frames' bytes, shape and dtype (and ``fps`` when given): a content key for caches."""
    h = hashlib.sha256()
    rate = "" if fps is None else f"{float(fps)!r}|"
    h.update(f"{tuple(frames.shape)}|{frames.dtype}|{rate}".encode())
    h.update(memoryview(np.ascontiguousarray(frames)).cast("B"))
    return h.hexdigest()


def video_fingerprint(video: Any) -> str:
    """:func:`frames_fingerprint` of a :class:`~tokenflow.storage.video.Video`'s frames and fps."""
    return frames_fingerprint(video.frames, video.fps)
