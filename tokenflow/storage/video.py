"""Video I/O: read clips (decord, PyAV or a folder of frames), resize, write H.264 mp4 / PNG frames.

Frames are always ``np.ndarray`` of shape (N, H, W, 3), dtype uint8, RGB. Writes are atomic: a temp
file in the target directory is renamed over the destination only once it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokenflow.errors import ConfigError, VideoError
from tokenflow.atomic import atomic_dir, atomic_file, naming_failures, temp_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BACKENDS = ("auto", "decord", "pyav")
_CHUNK = 16  # frames decoded per decord batch, bounds peak memory before resizing
H264_CRF = 10  # libx264 constant rate factor of written videos (near-lossless; imageio's quality=8)
H264_MAX_SIDE = 16384  # libx264 refuses wider or taller frames ("invalid width x height")


@dataclass
class Video:
    """A decoded clip: ``frames`` (N, H, W, 3) uint8 RGB, ``fps`` and the ``source`` it came from."""

    frames: np.ndarray
    fps: float
    source: str = ""

    def __post_init__(self) -> None:
        _check_frames(self.frames, "Video.frames")
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


def target_size(src_h: int, src_w: int, height: int | None, width: int | None, short_side: int = 512) -> tuple[int, int]:
    """Output (h, w) for a (src_h, src_w) source.

    Both given: exactly (height, width). One given: the other keeps the aspect ratio, rounded to the
    nearest multiple of 64 (min 64). Neither: the short side becomes ``short_side`` and the long side
    is the aspect-preserving value rounded the same way.
    """
    _check_sizes(height, width, short_side)
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


def read_video(
    path: str | os.PathLike, n_frames: int | None = None, stride: int = 1, start: int = 0,
    height: int | None = None, width: int | None = None, short_side: int = 512,
    *, backend: str = "auto", fps: float = 10.0,
) -> Video:
    """Read frames ``start, start + stride, ...`` (the first ``n_frames``; None = all) and resize.

    ``path`` is a video file or a folder of png/jpg/jpeg frames (sorted by name; ``fps`` applies to
    folders, and to files that carry no frame rate). ``backend``: "decord", "pyav" or "auto" (decord
    if importable, else PyAV). Returns frames (N, H, W, 3) uint8, sized by :func:`target_size`.
    """
    _check_selection(n_frames, stride, start)
    _check_sizes(height, width, short_side)
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is unknown — use one of {', '.join(BACKENDS)}")
    check_fps(fps, "fps")
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video not found: '{p}' — check the path (relative paths are resolved against {Path.cwd()})")
    size = (height, width, short_side)
    if p.is_dir():
        return Video(frames=_read_folder(p, n_frames, stride, start, size), fps=float(fps), source=str(p))
    with _native_stderr_silenced():  # the decoders' own FFmpeg logging: our errors say what went wrong
        info = probe_video(p)  # a clear error for what is not a readable video
        if info.rotation:
            log.info("'%s' is displayed rotated by %d degrees: reading its frames upright (%dx%d)", p, info.rotation,
                     info.height, info.width)
        if _pick_backend(backend) == "decord":
            try:
                frames, rate = _read_decord(p, n_frames, stride, start, size, fps)
            except VideoError:
                if backend != "auto":
                    raise
                frames, rate = _read_pyav(p, n_frames, stride, start, size, fps)  # PyAV reads some files decord cannot
        else:
            frames, rate = _read_pyav(p, n_frames, stride, start, size, fps)
    return Video(frames=frames, fps=float(rate), source=str(p))


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
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video not found: '{p}' — check the path (relative paths are resolved against {Path.cwd()})")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VideoError(f"no frames in folder '{p}' (looked for {'/'.join(IMAGE_SUFFIXES)}) — point at a video file or a folder of images")
        try:
            with Image.open(files[0]) as im:
                return VideoInfo(len(files), im.height, im.width, None)
        except OSError as exc:
            raise VideoError(f"could not read frame '{files[0]}': {_one_line(exc)} — replace or remove that file") from exc
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
        reason = getattr(exc, "strerror", None) or _one_line(exc)
        raise VideoError(f"'{p}' is not a readable video ({reason}) — check the file (ffprobe) or "
                         "export it again as mp4") from exc
    if not h or not w:
        raise VideoError(f"'{p}' has a video stream without a frame size — the file is damaged; export it again")
    if rotation % 180:
        h, w = w, h
    return VideoInfo(n, int(h), int(w), float(rate) if rate else None, rotation)


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


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> Path:
    """Write (N, H, W, 3) uint8 frames as H.264 (yuv420p) mp4, atomically; returns the path.

    Published only when ffmpeg exits cleanly and the file reads back with N frames of H x W: a full
    disk, a killed encoder or a size it refuses leaves no file under ``path`` (a VideoError instead).
    """
    p = Path(path)
    if p.suffix.lower() != ".mp4":
        raise ConfigError(f"write_video writes H.264 mp4, got '{p}' — use a path ending in .mp4")
    check_fps(fps, "fps")
    _check_frames(frames, "frames")
    n, h, w = frames.shape[:3]
    _check_writable_size(h, w)
    try:
        with atomic_file(p, suffix=".mp4", check=lambda tmp: check_video_file(tmp, n, h, w)) as tmp:
            _encode_h264(tmp, frames, fps)
    except (ConfigError, VideoError):
        raise
    except Exception as exc:
        raise VideoError(f"could not write video '{p}': {_one_line(exc)} — check disk space and permissions") from exc
    return p


def _check_writable_size(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise VideoError(f"frames are {h}x{w}; H.264 yuv420p needs even height and width — crop or resize")
    if max(h, w) > H264_MAX_SIDE:
        raise VideoError(f"frames are {h}x{w}; the H.264 encoder (libx264) takes at most {H264_MAX_SIDE} pixels a side "
                         "— resize them")


def _h264_command(path: Path, h: int, w: int, fps: float) -> list[str]:
    """ffmpeg reading raw RGB frames on stdin, writing H.264 (libx264, yuv420p) to ``path``."""
    import imageio_ffmpeg

    rate = str(Fraction(fps).limit_denominator(1001))
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-vcodec", "rawvideo",
            "-s", f"{w}x{h}", "-pix_fmt", "rgb24", "-r", rate, "-i", "-", "-an", "-vcodec", "libx264",
            "-pix_fmt", "yuv420p", "-crf", str(H264_CRF), str(path)]


def _encode_h264(path: Path, frames: np.ndarray, fps: float) -> None:
    """Pipe raw RGB frames into ffmpeg (libx264, yuv420p); raises OSError unless ffmpeg exits with 0."""
    n, h, w = frames.shape[:3]
    cmd = _h264_command(path, h, w, fps)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            assert proc.stdin is not None
            for frame in frames:
                proc.stdin.write(np.ascontiguousarray(frame).tobytes())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg quit early; its exit status and message say why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        status = proc.wait()
        log.seek(0)
        message = log.read().decode(errors="replace")
    if status != 0:
        raise OSError(f"ffmpeg exited with status {status}: {_one_line(Exception(message)) if message.strip() else 'no message'}")


def check_video_file(path: str | os.PathLike, n_frames: int, height: int, width: int) -> None:
    """Raise VideoError unless ``path`` opens as a video with ``n_frames`` frames of ``height`` x ``width``."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"'{path}' has no video stream")
            stream = container.streams.video[0]
            size = (stream.codec_context.height, stream.codec_context.width)
            count = sum(1 for packet in container.demux(stream) if packet.size)
    except VideoError:
        raise
    except Exception as exc:
        raise VideoError(f"the written video '{path}' does not read back: {_one_line(exc)}") from exc
    if count != n_frames or size != (height, width):
        raise VideoError(f"the written video '{path}' holds {count} frames of {size[0]}x{size[1]}, "
                         f"not {n_frames} of {height}x{width} — the encoder stopped early (disk full?)")


def write_frames(folder: str | os.PathLike, frames: np.ndarray) -> list[Path]:
    """Write (N, H, W, 3) uint8 frames as ``00000.png, 00001.png, ...`` (each atomically).

    A new ``folder`` is filled under a temporary name and renamed when complete; in an existing one,
    other files are left alone (use a new folder to read the frames back).
    """
    _check_frames(frames, "frames")
    out = Path(folder)
    names = [f"{i:05d}.png" for i in range(len(frames))]
    if not out.exists():  # a new folder appears whole: all frames or none
        with atomic_dir(out) as tmp:
            for name, frame in zip(names, frames):
                Image.fromarray(np.ascontiguousarray(frame)).save(tmp / name, format="PNG")
        return [out / name for name in names]
    for name, frame in zip(names, frames):
        with atomic_file(out / name) as tmp:
            Image.fromarray(np.ascontiguousarray(frame)).save(tmp, format="PNG")
    return [out / name for name in names]


class VideoWriter:
    """Write an H.264 mp4 chunk by chunk, as frames are produced (a context manager)::

        with VideoWriter("edited.mp4", fps) as out:
            for chunk in chunks:          # (F, H, W, 3) uint8 each
                out.write(chunk)

    Frames stream into ffmpeg writing a temporary file beside ``path``; leaving the block normally
    checks the file (ffmpeg's status, frame count and size read back, as :func:`write_video`), flushes
    it and renames it to ``path``. An exception in the block (or a kill) publishes nothing: the encoder
    is stopped and the temporary removed (a killed process's one is removed by ``remove_stale``).
    """

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ConfigError(f"VideoWriter writes H.264 mp4, got '{self.path}' — use a path ending in .mp4")
        self.fps, self.n_frames, self.size = check_fps(fps, "fps"), 0, None
        self._proc: subprocess.Popen | None = None
        self._log = self._tmp = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: np.ndarray) -> None:
        """Append (F, H, W, 3) uint8 frames (every chunk the size of the first)."""
        _check_frames(frames, "frames")
        size = tuple(frames.shape[1:3])
        if self._proc is None:
            _check_writable_size(*size)
            self.size = size
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = temp_path(self.path, ".mp4")
            self._log = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(_h264_command(self._tmp, *size, self.fps), stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=self._log)
        elif size != self.size:
            raise VideoError(f"frames of {size[0]}x{size[1]} after frames of {self.size[0]}x{self.size[1]} — every chunk "
                             "of a video must have one size")
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(np.ascontiguousarray(frames).tobytes())
        except BrokenPipeError:
            pass  # ffmpeg quit early; close() reports its status and message
        self.n_frames += len(frames)

    def close(self) -> Path:
        """Finish the file, check it and publish it under ``path``; VideoError (and nothing published) if the
        encoder failed or wrote fewer frames."""
        if self._proc is None:
            raise VideoError(f"no frames were written to '{self.path}' — write at least one frame")
        try:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
            status = self._proc.wait()
            self._log.seek(0)
            message = self._log.read().decode(errors="replace")
            if status != 0:
                raise VideoError(f"could not write video '{self.path}': ffmpeg exited with status {status}: "
                                 f"{_one_line(Exception(message)) if message.strip() else 'no message'} — check disk "
                                 "space and permissions")
            check_video_file(self._tmp, self.n_frames, *self.size)
            with open(self._tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._cleanup()
        return self.path

    def abort(self) -> None:
        """Stop the encoder and remove the temporary file: nothing is published."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._log is not None:
            self._log.close()
        self._proc, self._log = None, None


class FrameWriter:
    """Write PNG frames ``00000.png, 00001.png, ...`` chunk by chunk (a context manager, like :class:`VideoWriter`).

    A new ``folder`` is filled under a temporary name and renamed when the block ends normally: it
    appears whole or not at all. In an existing folder each frame is written atomically in place (as
    :func:`write_frames`).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder, self.n_frames = Path(folder), 0
        self._fresh = not self.folder.exists()
        self._tmp: Path | None = None

    def __enter__(self) -> "FrameWriter":
        if self._fresh:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = temp_path(self.folder)
            self._tmp.mkdir()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: np.ndarray) -> None:
        """Append (F, H, W, 3) uint8 frames."""
        _check_frames(frames, "frames")
        for frame in frames:
            name = f"{self.n_frames:05d}.png"
            if self._tmp is not None:
                with naming_failures(self.folder / name):  # PIL's close() drops the name of a file that did not fit
                    Image.fromarray(np.ascontiguousarray(frame)).save(self._tmp / name, format="PNG")
            else:
                with atomic_file(self.folder / name) as tmp:
                    Image.fromarray(np.ascontiguousarray(frame)).save(tmp, format="PNG")
            self.n_frames += 1

    def close(self) -> Path:
        if self._tmp is not None:
            if self.folder.exists():
                self.abort()
                raise FileExistsError(f"{self.folder} appeared while its frames were written — write into a new folder")
            os.rename(self._tmp, self.folder)
            self._tmp = None
        return self.folder

    def abort(self) -> None:
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def round_frames_down(video: Video, multiple: int) -> Video:
    """The first ``n_frames - n_frames % multiple`` frames (what the official TokenFlow code edits)."""
    keep = video.n_frames - video.n_frames % multiple
    if keep == 0:
        raise ConfigError(f"rounding {video.n_frames} frames down to a multiple of {multiple} leaves none — "
                          "lower keyframe_stride or read more frames")
    return video if keep == video.n_frames else Video(video.frames[:keep], video.fps, video.source)


def video_fingerprint(video: Video) -> str:
    """sha256 hex digest of the frame bytes, shape, dtype and fps: a content key for caches."""
    h = hashlib.sha256()
    h.update(f"{tuple(video.frames.shape)}|{video.frames.dtype}|{float(video.fps)!r}|".encode())
    h.update(memoryview(np.ascontiguousarray(video.frames)).cast("B"))
    return h.hexdigest()


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


def _round64(x: float) -> int:
    return max(64, int(round(x / 64.0)) * 64)


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:200]


def _check_frames(frames: np.ndarray, name: str) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        got = f"shape {getattr(frames, 'shape', None)} dtype {getattr(frames, 'dtype', type(frames).__name__)}"
        raise VideoError(f"{name} must be a (N, H, W, 3) uint8 array, got {got} — convert with frames_from_tensor or .astype(np.uint8)")
    if frames.shape[0] < 1:
        raise VideoError(f"{name} has 0 frames — pass at least one frame")


def _check_sizes(height: int | None, width: int | None, short_side: int) -> None:
    for name, value in (("height", height), ("width", width), ("short_side", short_side)):
        if value is not None and (value < 64 or value % 64):
            lo, hi = max(64, (value // 64) * 64), max(128, -(-value // 64) * 64)
            raise ConfigError(f"{name}={value} is not a multiple of 64 — use e.g. {lo} or {hi}")


def _check_selection(n_frames: int | None, stride: int, start: int) -> None:
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


def _fit(frames: Iterable[np.ndarray], size: tuple) -> np.ndarray:
    """Resize frames (each (H, W, 3) uint8) to ``target_size(H, W, *size)`` with PIL LANCZOS; stack."""
    out: list[np.ndarray] = []
    hw: tuple[int, int] | None = None
    for frame in frames:
        if hw is None:
            hw = target_size(frame.shape[0], frame.shape[1], *size)
        if frame.shape[:2] != hw:
            frame = np.asarray(Image.fromarray(frame).resize((hw[1], hw[0]), Image.Resampling.LANCZOS))
        out.append(frame)
    return np.stack(out)


def _read_folder(folder: Path, n_frames: int | None, stride: int, start: int, size: tuple) -> np.ndarray:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VideoError(f"no frames in folder '{folder}' (looked for {'/'.join(IMAGE_SUFFIXES)}) — point at a video file or a folder of images")
    indices = _select(len(files), n_frames, stride, start, folder)

    def load() -> Iterator[np.ndarray]:
        for i in indices:
            try:
                with Image.open(files[i]) as im:
                    yield np.asarray(im.convert("RGB"))
            except OSError as exc:
                raise VideoError(f"could not read frame '{files[i]}': {_one_line(exc)} — replace or remove that file") from exc

    return _fit(load(), size)


def _read_decord(path: Path, n_frames: int | None, stride: int, start: int, size: tuple,
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

    return _fit(load(), size), rate


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


def _read_pyav(path: Path, n_frames: int | None, stride: int, start: int, size: tuple, fps: float) -> tuple[np.ndarray, float]:
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
                    kept.append(_fit([picture], size)[0])
                total += 1
                if last is not None and total > last:
                    break
    except Exception as exc:
        if isinstance(exc, VideoError):
            raise
        reason = getattr(exc, "strerror", None) or _one_line(exc)
        raise VideoError(f"could not decode '{path}' with PyAV ({reason}) — the file is truncated or damaged; check it "
                         "with ffprobe or export it again") from exc
    indices = _select(total, n_frames, stride, start, path)
    return np.stack(kept[: len(indices)]), rate
