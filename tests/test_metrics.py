"""Weight-free metrics: PSNR against hand-computed values, OpenCV flow and warp error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenflow.errors import ConfigError, VideoError
from tokenflow.evaluation.metrics import optical_flow, psnr, warp_error, warp_metric_name
from tokenflow.storage.video import Video, read_video
from conftest import DATA, needs_data, translating_clip

METHODS = ["farneback", "dis"]


def flicker(frames: np.ndarray, amount: float = 0.2, seed: int = 1) -> np.ndarray:
    """Scale each frame's brightness by a random factor in [1 - amount, 1 + amount]."""
    gains = np.random.default_rng(seed).uniform(1 - amount, 1 + amount, (len(frames), 1, 1, 1))
    return np.clip(frames.astype(np.float64) * gains, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return translating_clip(n=8, shift=3)


# --- psnr ---------------------------------------------------------------------------------------


def test_psnr_identical_is_inf(clip: np.ndarray) -> None:
    assert psnr(clip, clip.copy()) == math.inf


def test_psnr_known_values() -> None:
    a = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert psnr(a, a + 10) == pytest.approx(20 * math.log10(255 / 10))  # mse 100 -> 28.1308 dB
    # uint8 inputs must not wrap: |10 - 200| = 190, not 76.
    assert psnr(a + 10, a + 200) == pytest.approx(20 * math.log10(255 / 190))
    # Identical frames are left out of the mean (documented policy), not capped.
    mixed = a.copy()
    mixed[1] += 10
    assert psnr(a, mixed) == pytest.approx(20 * math.log10(255 / 10))


def test_psnr_noise_against_hand_computed() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(20, 230, (3, 16, 16, 3)).astype(np.uint8)
    noise = rng.integers(-5, 6, a.shape)
    b = (a.astype(np.int64) + noise).astype(np.uint8)
    mse = (noise.reshape(3, -1) ** 2).mean(axis=1)
    assert psnr(a, b) == pytest.approx(np.mean(10 * np.log10(255.0**2 / mse)))


def test_psnr_tensor_and_errors() -> None:
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x, x + 0.2, data_range=2.0) == pytest.approx(20 * math.log10(2.0 / 0.2), rel=1e-6)
    with pytest.raises(ConfigError, match="differ in shape"):
        psnr(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 5, 3)))
    with pytest.raises(ConfigError, match="data_range=0"):
        psnr(x, x, data_range=0)


# --- optical flow -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_flow_recovers_translation(clip: np.ndarray, method: str) -> None:
    flow = optical_flow(clip[0], clip[1], method)  # content moves left by 3 px
    assert flow.shape == (64, 128, 2) and flow.dtype == np.float32
    inner = flow[8:-8, 8:-8]
    assert np.median(inner[..., 0]) == pytest.approx(-3.0, abs=0.3)
    assert np.median(inner[..., 1]) == pytest.approx(0.0, abs=0.3)


def test_flow_errors(clip: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="method='raft'"):
        optical_flow(clip[0], clip[1], "raft")
    with pytest.raises(VideoError, match="uint8"):
        optical_flow(clip[0].astype(np.float32), clip[1])


# --- warp error ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_warp_error_synthetic(clip: np.ndarray, method: str) -> None:
    same = warp_error(clip, clip, method)
    flick = warp_error(flicker(clip), clip, method)
    # Measured: ~1e-4 for source vs itself (flow and bilinear residual), ~1e-2 with 20% flicker.
    assert same["warp_error"] < 1e-3
    assert flick["warp_error"] > 10 * same["warp_error"] and flick["warp_error"] > 3e-3
    for result in (same, flick):
        assert 0.0 <= result["occluded_fraction"] <= 1.0
        assert result["pairs"] == len(clip) - 1
        assert result["flow"] == f"opencv-{method}"
        assert result["metric_name"] == warp_metric_name(method) == f"warp_error@opencv-{method}"


def test_warp_error_accepts_video_and_rejects_bad_input(clip: np.ndarray) -> None:
    video = Video(clip, fps=10.0)
    assert warp_error(video, video)["warp_error"] < 1e-3
    with pytest.raises(VideoError, match="differ in shape"):
        warp_error(clip[:, :32], clip)
    with pytest.raises(VideoError, match="at least 2 frames"):
        warp_error(clip[:1], clip[:1])
    with pytest.raises(VideoError, match="uint8"):
        warp_error(clip.astype(np.float32), clip)
    with pytest.raises(ConfigError, match="method='raft'"):
        warp_error(clip, clip, "raft")


@needs_data
def test_warp_error_real_wolf() -> None:
    source = read_video(DATA / "wolf.mp4", n_frames=12, height=128, width=128).frames
    shuffled = source[np.random.default_rng(0).permutation(len(source))]
    same, mixed = warp_error(source, source), warp_error(shuffled, source)
    # Measured at 128x128, 12 frames, Farneback: ~4.5e-4 self, ~1.4e-2 shuffled, ~1.4% occluded.
    assert same["warp_error"] < 2e-3
    assert mixed["warp_error"] > 10 * same["warp_error"]
    assert 0.0 <= same["occluded_fraction"] < 0.2
