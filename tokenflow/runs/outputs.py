"""A run folder's videos: where its output and input are, read at the size they were stored at."""
from __future__ import annotations

from pathlib import Path


from tokenflow.runs.layout import EDITED, FRAMES, INPUT, RECONSTRUCTION
from tokenflow.storage.decoders import IMAGE_SUFFIXES
from tokenflow.storage.video import Video, read_video


def output_path(run: str | Path) -> Path | None:
    """The run's output frames: ``frames/`` (lossless) if it holds images, else ``edited.mp4`` / ``reconstruction.mp4``."""
    run = Path(run)
    frames = run / FRAMES
    if frames.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in frames.iterdir()):
        return frames
    return next((p for p in (run / EDITED, run / RECONSTRUCTION) if p.is_file()), None)


def input_path(run: str | Path) -> Path | None:
    """The run's source frames (``input.mp4``), if it wrote them."""
    p = Path(run) / INPUT
    return p if p.is_file() else None


def read_native(path: str | Path) -> Video:
    """Frames of a video file or a folder of images at their stored size (no resizing), as a Video: the library's
    reader (:func:`~tokenflow.storage.video.read_video` with ``native=True``), its errors included."""
    return read_video(path, native=True)
