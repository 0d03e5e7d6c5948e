"""Decode clips into (N, H, W, 3) uint8 RGB frames (decord, PyAV or a folder of images) and probe their headers.

Display-rotated clips are read upright, as players show them; frames are resized to
:func:`~tokenflow.sizing.target_size` as they are read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tokenflow.errors import ConfigError, VideoError, one_line
from tokenflow.sizing import target_size

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BACKENDS = ("auto", "decord", "pyav")
_CHUNK = 16  # frames decoded per decord batch, bounds peak memory before resizing


def decode(path: str | os.PathLike, n_frames: int | None, stride: int, start: int, size: tuple | None,
           backend: str = "auto", fps: float = 10.0) -> tuple[np.ndarray, float]:
    """Frames ``start, start + stride, ...`` (the first ``n_frames``; None = all) of a clip or frame folder, each
    resized to ``target_size(H, W, *size)`` (``size`` None: as stored), and the clip's frame rate (``fps`` for
    folders and clips storing none).

    ``backend``: "decord", "pyav" or "auto" (decord if importable, else PyAV; PyAV also when decord cannot read
    the file).
    """
    p = _existing(path)
    if p.is_dir():
        return _read_folder(p, n_frames, stride, start, size), float(fps)
    with _native_stderr_silenced():  # the decoders' own FFmpeg logging: our errors say what went wrong
        info = probe_video(p)  # a clear error for what is not a readable video
        if info.rotation:
            log.info("'%s' is displayed rotated by %d degrees: reading its frames upright (%dx%d)", p, info.rotation,
                     info.height, info.width)
        if _pick_backend(backend) == "decord":
            try:
                return _read_decord(p, n_frames, stride, start, size, fps)
            except VideoError:
                if backend != "auto":
                    raise
        return _read_pyav(p, n_frames, stride, start, size, fps)  # PyAV reads some files decord cannot


@dataclass(frozen=True)
class VideoInfo:
    """What a clip's header says: frame count (None when the container does not store it), size, rate."""

    n_frames: int | None
    height: int        # as displayed: the stored frame turned by ``rotation``
    width: int
    fps: float | None
    rotation: int = 0  # degrees counter-clockwise a player turns the stored frames by (display matrix): 0/90/180/270


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video file's header (or a frame folder's first image) without decoding the clip.

    Raises VideoError with one line for a missing path, a file that is not a video (audio only, text,
    damaged header) or a folder without images.
    """
    p = _existing(path)
    if p.is_dir():
        files = _frame_files(p)
        try:
            with Image.open(files[0]) as im:
                return VideoInfo(len(files), im.height, im.width, None)
        except OSError as exc:
            raise VideoError(f"could not read frame '{files[0]}': {one_line(exc)} — replace or remove that file") from exc
    if p.stat().st_size == 0:
        raise VideoError(f"'{p}' is empty (0 bytes) — the file was not written completely; copy or export it again")
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no"]
                raise VideoError(f"'{p}' has no video stream ({'/'.join(kinds)} streams only) — pass a video file")
            stream = container.streams.video[0]
            h, w = stream.codec_context.height, stream.codec_context.width
            rate = stream.average_rate or stream.guessed_rate
            n = int(stream.frames) or (1 if container.format.name.endswith("_pipe") else None)  # one image
            rotation = _first_frame_rotation(container, stream)
    except VideoError:
        raise
    except Exception as exc:
        reason = getattr(exc, "strerror", None) or one_line(exc)
        raise VideoError(f"'{p}' is not a readable video ({reason}) — check the file (ffprobe) or "
                         "export it again as mp4") from exc
    if not h or not w:
        raise VideoError(f"'{p}' has a video stream without a frame size — the file is damaged; export it again")
    if rotation % 180:
        h, w = w, h
    return VideoInfo(n, int(h), int(w), float(rate) if rate else None, rotation)


def _existing(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or a VideoError when nothing is there."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video not found: '{p}' — check the path (relative paths are resolved against {Path.cwd()})")
    return p


def _frame_files(folder: Path) -> list[Path]:
    """The png/jpg/jpeg files of ``folder`` sorted by name, or a VideoError when there are none."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VideoError(f"no frames in folder '{folder}' (looked for {'/'.join(IMAGE_SUFFIXES)}) — point at a video file or a folder of images")
    return files


def _first_frame_rotation(container: Any, stream: Any) -> int:
    """The display rotation of the stream's first frame (PyAV's ``frame.rotation``, from the display matrix),
    as 0, 90, 180 or 270 degrees counter-clockwise; 0 when no frame decodes (the read reports that)."""
    try:
        frame = next(container.decode(stream))
    except Exception:
        return 0
    return _quarter_turns(getattr(frame, "rotation", 0)) * 90


def _quarter_turns(rotation: Any) -> int:
    """Counter-clockwise quarter turns (0-3) of a display rotation in degrees (PyAV reports -90 for 270)."""
    return round(float(rotation or 0) / 90) % 4


def _upright(frame: np.ndarray, turns: int) -> np.ndarray:
    """``frame`` turned ``turns`` quarter turns counter-clockwise, as players display a rotated clip."""
    return np.ascontiguousarray(np.rot90(frame, turns)) if turns else frame


def _clip_rate(rate: Any, fallback: float, path: Path) -> float:
    """A decoder's frame rate, or ``fallback`` with a warning when the container stores none that is usable."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        value = math.nan
    if math.isfinite(value) and value > 0:
        return value
    log.warning("'%s' stores no usable frame rate (%s): using fps=%g — pass fps= to read_video for another", path,
                rate, fallback)
    return float(fallback)


def check_selection(n_frames: int | None, stride: int, start: int) -> None:
    """A ConfigError unless the frames ``start, start + stride, ...`` (``n_frames`` of them, None = all) can exist."""
    if n_frames is not None and n_frames < 1:
        raise ConfigError(f"n_frames={n_frames} must be >= 1 — or None for all frames")
    if stride < 1:
        raise ConfigError(f"stride={stride} must be >= 1 — use 1 for every frame")
    if start < 0:
        raise ConfigError(f"start={start} must be >= 0 — it is the index of the first frame")


def _select(total: int, n_frames: int | None, stride: int, start: int, source: Path) -> list[int]:
    """Frame indices to read from a clip of ``total`` frames, or a VideoError if it is too short."""
    indices = list(range(start, total, stride))
    if total == 0:
        raise VideoError(f"video '{source}' has no decodable frames — the file is truncated or damaged; export it again")
    if n_frames is None and not indices:
        raise VideoError(f"video '{source}' has {total} frames; start={start} is past the end — lower start")
    if n_frames is not None and len(indices) < n_frames:
        needs = start + (n_frames - 1) * stride + 1
        at = f" from start {start}" if start else ""
        raise VideoError(f"video '{source}' has {total} frames; n_frames={n_frames} with stride {stride}{at} needs {needs} — lower n_frames or stride")
    return indices[:n_frames] if n_frames is not None else indices


def _pick_backend(backend: str) -> str:
    """"decord" or "pyav": auto picks decord when it imports (and falls back to PyAV on a file decord cannot read)."""
    if backend != "pyav":
        try:
            import decord  # noqa: F401

            return "decord"
        except ImportError:
            if backend == "decord":
                raise ConfigError("backend='decord' but decord is not installed — pip install decord or use backend='pyav'") from None
    return "pyav"


def _fit(frames: Iterable[np.ndarray], size: tuple | None, source: Path | None = None) -> np.ndarray:
    """Resize frames (each (H, W, 3) uint8) to ``target_size(H, W, *size)`` with PIL LANCZOS; stack. ``size`` None:
    as stored (all frames must then share the first one's size)."""
    out: list[np.ndarray] = []
    hw: tuple[int, int] | None = None
    for frame in frames:
        if hw is None:
            hw = frame.shape[:2] if size is None else target_size(frame.shape[0], frame.shape[1], *size)
        if frame.shape[:2] != hw and size is None:
            raise VideoError(f"'{source}' has frames of {frame.shape[1]}x{frame.shape[0]} after {hw[1]}x{hw[0]}: read "
                             "at its stored size, every frame must have one size — give height/width to resize them")
        if frame.shape[:2] != hw:
            frame = np.asarray(Image.fromarray(frame).resize((hw[1], hw[0]), Image.Resampling.LANCZOS))
        out.append(frame)
    return np.stack(out)


def _read_folder(folder: Path, n_frames: int | None, stride: int, start: int, size: tuple | None) -> np.ndarray:
    files = _frame_files(folder)
    indices = _select(len(files), n_frames, stride, start, folder)

    def load() -> Iterator[np.ndarray]:
        for i in indices:
            try:
                with Image.open(files[i]) as im:
                    yield np.asarray(im.convert("RGB"))
            except OSError as exc:
                raise VideoError(f"could not read frame '{files[i]}': {one_line(exc)} — replace or remove that file") from exc

    return _fit(load(), size, folder)


def _read_decord(path: Path, n_frames: int | None, stride: int, start: int, size: tuple | None,
                 fps: float = 10.0) -> tuple[np.ndarray, float]:
    """Frames with decord (which turns display-rotated clips upright itself, as players do: tested)."""
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total, rate = len(reader), _clip_rate(reader.get_avg_fps(), fps, path)
    except Exception as exc:
        raise VideoError(f"decord cannot open '{path}' — the file may be damaged or in a format decord lacks; "
                         "check it with ffprobe or use backend='pyav'") from exc
    indices = _select(total, n_frames, stride, start, path)

    def load() -> Iterator[np.ndarray]:
        for lo in range(0, len(indices), _CHUNK):
            try:
                batch = reader.get_batch(indices[lo : lo + _CHUNK]).asnumpy()
            except Exception as exc:
                raise VideoError(f"could not decode frames {indices[lo]}-{indices[min(lo + _CHUNK, len(indices)) - 1]} "
                                 f"of '{path}' with decord — the file may be truncated; try backend='pyav' or fewer frames") from exc
            yield from batch

    return _fit(load(), size, path), rate


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what native code (decord's bundled FFmpeg) prints on file descriptor 2 to a discarded file."""
    fd = 2  # native code writes to descriptor 2 whatever sys.stderr is (a notebook's or pytest's capture)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no descriptor 2: nothing can leak
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), fd)
            try:
                yield
            finally:
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def _read_pyav(path: Path, n_frames: int | None, stride: int, start: int, size: tuple | None,
              fps: float) -> tuple[np.ndarray, float]:
    import av

    last = start + (n_frames - 1) * stride if n_frames is not None else None
    kept: list[np.ndarray] = []
    total = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"'{path}' has no video stream — pass a video file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = _clip_rate(stream.average_rate or stream.guessed_rate, fps, path)
            for frame in container.decode(stream):
                if total >= start and (total - start) % stride == 0:
                    picture = _upright(frame.to_ndarray(format="rgb24"), _quarter_turns(getattr(frame, "rotation", 0)))
                    kept.append(picture if size is None else _fit([picture], size)[0])
                total += 1
                if last is not None and total > last:
                    break
    except Exception as exc:
        if isinstance(exc, VideoError):
            raise
        reason = getattr(exc, "strerror", None) or one_line(exc)
        raise VideoError(f"could not decode '{path}' with PyAV ({reason}) — the file is truncated or damaged; check it "
                         "with ffprobe or export it again") from exc
    indices = _select(total, n_frames, stride, start, path)
    return _fit(kept[: len(indices)], None, path), rate  # checked to share one size; resized above if asked
