"""Video I/O: round trips on synthetic clips, real clips, sizing rules, errors and atomic writes."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tokenflow.digests import video_fingerprint
from tokenflow.errors import ConfigError, VideoError
from tokenflow.sizing import target_size
from tokenflow.storage.decoders import probe_video
from tokenflow.storage.mp4 import write_video
from tokenflow.storage.png import write_frames
from tokenflow.storage.video import Video, frames_from_tensor, read_video
from conftest import DATA, needs_data, translating_clip

BACKENDS = ["decord", "pyav"]


def luma(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H, W) float64 grayscale."""
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float64)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return translating_clip()


@pytest.fixture(scope="module")
def clip_mp4(clip: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("mp4") / "clip.mp4", clip, fps=20.0)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_mp4_round_trip(clip: np.ndarray, clip_mp4: Path, backend: str) -> None:
    video = read_video(clip_mp4, height=64, width=128, backend=backend)
    assert video.frames.shape == clip.shape and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(20.0, rel=1e-3)
    assert video.source == str(clip_mp4)
    # H.264 yuv420p at quality 8 is lossy. Measured on this saturated random-colour texture: luma mean
    # abs error ~1.4 / 255; RGB mean abs error ~6.6 / 255, mostly from 4:2:0 chroma subsampling.
    assert np.abs(luma(video.frames) - luma(clip)).mean() < 3.0
    assert np.abs(video.frames.astype(np.float64) - clip).mean() < 10.0


def test_backends_agree_and_select_frames(clip_mp4: Path) -> None:
    full = read_video(clip_mp4, height=64, width=128, backend="decord").frames
    for backend in BACKENDS:
        picked = read_video(clip_mp4, n_frames=3, stride=3, start=1, height=64, width=128, backend=backend)
        np.testing.assert_array_equal(picked.frames, full[1:8:3])


def test_auto_falls_back_to_pyav_without_decord(clip_mp4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    assert read_video(clip_mp4, n_frames=2, height=64, width=128).n_frames == 2
    with pytest.raises(ConfigError, match="decord"):
        read_video(clip_mp4, backend="decord")


def test_frame_folder_round_trip_is_exact(clip: np.ndarray, tmp_path: Path) -> None:
    paths = write_frames(tmp_path / "frames", clip)
    assert [p.name for p in paths[:2]] == ["00000.png", "00001.png"] and len(paths) == len(clip)
    video = read_video(tmp_path / "frames", height=64, width=128, fps=7.0)
    np.testing.assert_array_equal(video.frames, clip)
    assert video.fps == 7.0
    picked = read_video(tmp_path / "frames", n_frames=3, stride=2, start=1, height=64, width=128)
    np.testing.assert_array_equal(picked.frames, clip[1:6:2])
    assert picked.fps == 10.0


def test_resizes_on_read(clip: np.ndarray, tmp_path: Path) -> None:
    write_frames(tmp_path, clip[:2])
    assert read_video(tmp_path).frames.shape == (2, 512, 1024, 3)  # short side 512, aspect kept
    assert read_video(tmp_path, height=128).frames.shape == (2, 128, 256, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_reads_any_stored_size(clip: np.ndarray, tmp_path: Path, backend: str) -> None:
    """native=True keeps the stored size, not a multiple of 64 (a contact sheet, a mask video): a frame folder
    exactly, an mp4 at its size on either decoder; frames of two sizes, or a size asked for too, are one line."""
    odd = clip[:3, :46, :90]  # 46x90: no multiple of 64, even (H.264 needs even sides)
    write_frames(tmp_path / "frames", odd)
    np.testing.assert_array_equal(read_video(tmp_path / "frames", native=True).frames, odd)
    mp4 = write_video(tmp_path / "odd.mp4", odd, fps=12.0)
    video = read_video(mp4, native=True, backend=backend)
    assert video.frames.shape == odd.shape and video.fps == pytest.approx(12.0, rel=1e-3)
    assert np.abs(luma(video.frames) - luma(odd)).mean() < 3.0
    write_frames(tmp_path / "mixed", clip[:1, :32, :32])
    (tmp_path / "mixed" / "00000.png").rename(tmp_path / "mixed" / "a.png")
    write_frames(tmp_path / "mixed2", clip[:1, :64, :64])
    (tmp_path / "mixed2" / "00000.png").rename(tmp_path / "mixed" / "b.png")
    with pytest.raises(VideoError, match="has frames of 64x64 after 32x32") as e:
        read_video(tmp_path / "mixed", native=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="native=True\\) keeps the stored size; height=64"):
        read_video(mp4, native=True, height=64)


def test_tensor_round_trip(clip: np.ndarray) -> None:
    video = Video(clip, fps=20.0, source="synthetic")
    x = video.to_tensor()
    assert x.shape == (12, 3, 64, 128) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_array_equal(frames_from_tensor(x), clip)
    assert Video.from_tensor(x, fps=20.0).height == 64
    clamped = frames_from_tensor(torch.full((1, 3, 2, 2), 3.0))
    assert clamped.shape == (1, 2, 2, 3) and (clamped == 255).all()
    assert (video.n_frames, video.height, video.width) == (12, 64, 128)


def test_fingerprint_is_a_content_key(clip: np.ndarray) -> None:
    base = video_fingerprint(Video(clip, fps=20.0, source="a"))
    assert base == video_fingerprint(Video(clip.copy(), fps=20.0, source="b")) and len(base) == 64
    changed = clip.copy()
    changed[0, 0, 0, 0] ^= 1
    assert video_fingerprint(Video(changed, fps=20.0)) != base
    assert video_fingerprint(Video(clip, fps=10.0)) != base


# --- real clips ---------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_wolf_strided(backend: str) -> None:
    video = read_video(DATA / "wolf.mp4", n_frames=8, stride=2, height=128, width=128, backend=backend)
    assert video.frames.shape == (8, 128, 128, 3)
    assert video.fps == pytest.approx(20.0)


@needs_data
def test_real_woman_running_width_only() -> None:
    video = read_video(DATA / "woman-running.mp4", n_frames=2, width=256)
    assert video.frames.shape == (2, 256, 256, 3)  # 512x512 source: height follows the aspect


@needs_data
def test_real_wolf_too_short() -> None:
    with pytest.raises(VideoError, match=r"has 40 frames; n_frames=50 with stride 1 needs 50"):
        read_video(DATA / "wolf.mp4", n_frames=50)


# --- sizing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "height", "width", "short_side", "expected"),
    [
        ((512, 512), None, None, 512, (512, 512)),
        ((480, 854), None, None, 512, (512, 896)),  # 854 * 512 / 480 = 910.9 -> 896
        ((854, 480), None, None, 512, (896, 512)),
        ((480, 854), None, None, 256, (256, 448)),
        ((480, 854), 256, None, 512, (256, 448)),
        ((480, 854), None, 512, 512, (256, 512)),  # 480 * 512 / 854 = 287.8 -> 256
        ((480, 854), 128, 640, 512, (128, 640)),
        ((1000, 10), 64, None, 512, (64, 64)),  # never below 64
    ],
)
def test_target_size(src: tuple[int, int], height: int | None, width: int | None, short_side: int, expected: tuple[int, int]) -> None:
    assert target_size(*src, height, width, short_side) == expected


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"n_frames": 0}, ConfigError, "n_frames=0"),
        ({"stride": 0}, ConfigError, "stride=0"),
        ({"start": -1}, ConfigError, "start=-1"),
        ({"height": 100}, ConfigError, "height=100 is not a multiple of 64 — use e.g. 64 or 128"),
        ({"width": 30}, ConfigError, "width=30"),
        ({"short_side": 500}, ConfigError, "short_side=500"),
        ({"backend": "opencv"}, ConfigError, "backend='opencv'"),
        ({"fps": 0.0}, ConfigError, "fps=0.0"),
        ({"n_frames": 50}, VideoError, r"has 12 frames; n_frames=50 with stride 1 needs 50 — lower n_frames or stride"),
        ({"n_frames": 5, "stride": 3}, VideoError, r"has 12 frames; n_frames=5 with stride 3 needs 13"),
        ({"start": 12}, VideoError, "start=12 is past the end"),
    ],
)
def test_read_errors(clip_mp4: Path, kwargs: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        read_video(clip_mp4, **kwargs)


def test_missing_path_names_path_and_cwd(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="video not found: .*nope.mp4") as info:
        read_video(tmp_path / "nope.mp4")
    assert str(Path.cwd()) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_file(tmp_path: Path, backend: str) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01 this is not a video" * 100)
    with pytest.raises(VideoError, match="'.*bad.mp4' is not a readable video") as info:
        read_video(bad, backend=backend)
    assert "\n" not in str(info.value)


def test_probe_reads_the_header_only(clip: np.ndarray, clip_mp4: Path, tmp_path: Path) -> None:
    info = probe_video(clip_mp4)
    assert (info.n_frames, info.height, info.width, info.fps) == (len(clip), 64, 128, 20.0)
    write_frames(tmp_path / "f", clip[:3])
    folder = probe_video(tmp_path / "f")
    assert (folder.n_frames, folder.height, folder.width) == (3, 64, 128)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="is empty"):
        probe_video(tmp_path / "empty.mp4")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no frames here")
    with pytest.raises(VideoError, match="no frames in folder"):
        read_video(tmp_path)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 64, 64, 3), dtype=np.float32),  # wrong dtype
        np.zeros((2, 64, 64), dtype=np.uint8),  # wrong shape
        np.zeros((2, 63, 64, 3), dtype=np.uint8),  # odd height: yuv420p cannot hold it
    ],
)
def test_rejected_write_leaves_nothing(tmp_path: Path, frames: np.ndarray) -> None:
    with pytest.raises(VideoError):
        write_video(tmp_path / "out.mp4", frames, fps=10.0)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file_and_no_temp(clip: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenflow.storage.mp4 as mp4

    out = write_video(tmp_path / "out.mp4", clip[:2], fps=10.0)
    before = out.read_bytes()

    def encoder_dies(path: Path, frames: np.ndarray, fps: float) -> None:
        path.write_bytes(b"\x00" * 100)  # what the encoder managed before the disk filled up
        raise OSError("ffmpeg exited with status 1: No space left on device (simulated)")

    monkeypatch.setattr(mp4, "_encode_h264", encoder_dies)
    with pytest.raises(VideoError, match="could not write video .*No space left"):
        write_video(out, clip, fps=10.0)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_written_video_is_checked_before_it_is_published(clip: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder that exits cleanly but wrote a truncated or empty file publishes nothing."""
    import tokenflow.storage.mp4 as mp4

    real = mp4._encode_h264
    for broken in (lambda path, frames, fps: real(path, frames[:-1], fps), lambda path, frames, fps: path.write_bytes(b"")):
        monkeypatch.setattr(mp4, "_encode_h264", broken)
        with pytest.raises(VideoError, match="edited.mp4"):
            write_video(tmp_path / "edited.mp4", clip, fps=10.0)
        assert list(tmp_path.iterdir()) == []


def test_new_frame_folder_appears_whole(clip: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    real_save, calls = Image.Image.save, []

    def save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError, match="disk full"):
        write_frames(tmp_path / "frames", clip[:5])
    assert list(tmp_path.iterdir()) == []  # no frames/ with 2 of 5 frames, no temporary folder


def test_write_rejects_non_mp4(clip: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="out.avi"):
        write_video(tmp_path / "out.avi", clip, fps=10.0)
    with pytest.raises(ConfigError, match="fps=0"):
        write_video(tmp_path / "out.mp4", clip, fps=0)


def test_round_frames_down_keeps_whole_chunks():
    from tokenflow.sizing import round_frames_down

    video = Video(np.zeros((19, 64, 64, 3), np.uint8), 10.0, "x")
    assert round_frames_down(video, 8).n_frames == 16
    assert round_frames_down(video, 1) is video
    with pytest.raises(ConfigError, match="19 frames down to a multiple of 20 leaves none"):
        round_frames_down(video, 20)


# ---- frame rates and display rotation --------------------------------------------------------------
@pytest.mark.parametrize("fps", [0, -5.0, float("nan"), float("inf")])
def test_a_frame_rate_must_be_positive_and_finite(fps: float, tmp_path: Path) -> None:
    from tokenflow.storage.mp4 import VideoWriter

    frames = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ConfigError, match=r"Video.fps=.* is not a frame rate — give a positive number"):
        Video(frames, fps=fps)
    with pytest.raises(ConfigError, match=r"fps=.* is not a frame rate"):
        write_video(tmp_path / "x.mp4", frames, fps)  # the value is named, not the disk blamed
    with pytest.raises(ConfigError, match=r"fps=.* is not a frame rate"):
        VideoWriter(tmp_path / "y.mp4", fps)
    with pytest.raises(ConfigError, match=r"fps=.* is not a frame rate"):
        read_video(tmp_path, fps=fps)
    assert not list(tmp_path.iterdir())


def _ffmpeg(*args: str) -> None:
    import subprocess

    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def marked_clip(tmp_path_factory) -> tuple[np.ndarray, Path]:
    """A 64x128 (h x w) clip, dark with a bright block in its top-left corner, as stored in a phone video."""
    frames = np.full((3, 64, 128, 3), 30, np.uint8)
    frames[:, :24, :32] = 230
    path = tmp_path_factory.mktemp("rotation") / "plain.mp4"
    write_video(path, frames, 10.0)
    return frames, path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("degrees, turns", [(90, 1), (180, 2), (270, 3), (-90, 3)])
def test_rotated_clips_are_read_upright(marked_clip, degrees: int, turns: int, backend: str, tmp_path: Path) -> None:
    """A display-rotated clip (the display matrix a phone writes) reads as a player shows it: the stored frames
    turned counter-clockwise by the rotation (what ffmpeg's autorotate shows), its header giving that size."""
    frames, plain = marked_clip
    rotated = tmp_path / "rotated.mp4"
    _ffmpeg("-display_rotation", str(degrees), "-i", str(plain), "-c", "copy", str(rotated))
    upright = np.rot90(frames, turns, axes=(1, 2))
    info = probe_video(rotated)
    assert (info.height, info.width, info.rotation) == (*upright.shape[1:3], (turns * 90) % 360)
    video = read_video(rotated, backend=backend, height=info.height, width=info.width)
    assert video.frames.shape == upright.shape
    assert np.abs(video.frames.astype(int) - upright.astype(int)).mean() < 6  # H.264, the block where it is shown
    default = read_video(rotated, backend=backend)  # default sizing follows the displayed aspect (portrait here)
    assert (default.height > default.width) == (upright.shape[1] > upright.shape[2])


def test_a_clip_without_a_usable_frame_rate_reads_at_the_fallback(clip: np.ndarray, tmp_path: Path, caplog) -> None:
    """An mp4 whose sample durations are all 0 (decord then reports fps nan) reads at ``fps=`` with a warning."""
    import struct

    data = bytearray(write_video(tmp_path / "timed.mp4", clip[:4], fps=20.0).read_bytes())
    at = data.find(b"stts")
    for k in range(struct.unpack(">I", data[at + 8 : at + 12])[0]):  # every (count, delta) entry: delta 0
        struct.pack_into(">I", data, at + 16 + 8 * k, 0)
    untimed = tmp_path / "untimed.mp4"
    untimed.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="tokenflow.storage.decoders"):
        video = read_video(untimed, backend="decord", height=64, width=128, fps=12.0)
    assert video.fps == 12.0 and video.n_frames == 4
    assert any("no usable frame rate" in r.getMessage() and "untimed.mp4" in r.getMessage() for r in caplog.records)
