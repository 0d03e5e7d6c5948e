"""Write H.264 mp4 files (libx264, yuv420p) through ffmpeg, whole or streamed, published only once they read back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from tokenflow.atomic import AtomicWriter, atomic_file, temp_path
from tokenflow.errors import ConfigError, VideoError, one_line
from tokenflow.storage.frames import check_fps, check_frames

H264_CRF = 10  # libx264 constant rate factor of written videos (near-lossless; imageio's quality=8)
H264_MAX_SIDE = 16384  # libx264 refuses wider or taller frames ("invalid width x height")


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> Path:
    """Write (N, H, W, 3) uint8 frames as H.264 (yuv420p) mp4, atomically; returns the path.

    Published only when ffmpeg exits cleanly and the file reads back with N frames of H x W: a full
    disk, a killed encoder or a size it refuses leaves no file under ``path`` (a VideoError instead).
    """
    p = Path(path)
    if p.suffix.lower() != ".mp4":
        raise ConfigError(f"write_video writes H.264 mp4, got '{p}' — use a path ending in .mp4")
    check_fps(fps, "fps")
    check_frames(frames, "frames")
    n, h, w = frames.shape[:3]
    _check_writable_size(h, w)
    try:
        with atomic_file(p, suffix=".mp4", check=lambda tmp: check_video_file(tmp, n, h, w)) as tmp:
            _encode_h264(tmp, frames, fps)
    except (ConfigError, VideoError):
        raise
    except Exception as exc:
        raise VideoError(f"could not write video '{p}': {one_line(exc)} — check disk space and permissions") from exc
    return p


class VideoWriter(AtomicWriter):
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

    def write(self, frames: np.ndarray) -> None:
        """Append (F, H, W, 3) uint8 frames (every chunk the size of the first)."""
        check_frames(frames, "frames")
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
                                 f"{one_line(Exception(message)) if message.strip() else 'no message'} — check disk "
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
        raise VideoError(f"the written video '{path}' does not read back: {one_line(exc)}") from exc
    if count != n_frames or size != (height, width):
        raise VideoError(f"the written video '{path}' holds {count} frames of {size[0]}x{size[1]}, "
                         f"not {n_frames} of {height}x{width} — the encoder stopped early (disk full?)")


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
        raise OSError(f"ffmpeg exited with status {status}: {one_line(Exception(message)) if message.strip() else 'no message'}")
