"""Weight-free metrics: PSNR and SSIM against hand-computed values (and skimage), masks, OpenCV flow, warp error,
Lucas-Kanade tracks on clips with known motion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenflow.errors import ConfigError, VideoError
from tokenflow.evaluation.metrics import (SSIM_RADIUS, good_features, lk_tracks, masked_psnr, masked_ssim, optical_flow,
                                          psnr, ssim_map, track_error, warp_error, warp_metric_name)
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


# --- warp error: known answers --------------------------------------------------------------------


def test_warp_error_of_a_static_video_is_zero(clip: np.ndarray) -> None:
    static = np.repeat(clip[:1], 4, axis=0)
    result = warp_error(static, static)
    # Farneback finds a residual flow of ~1e-3 px on identical frames: measured warp error 1e-7
    assert result["warp_error"] < 1e-6 and result["occluded_fraction"] < 0.05  # border pixels nudged outside


def test_warp_error_uses_the_source_motion(clip: np.ndarray) -> None:
    """Another texture moving exactly like the source is warped by the source's flow: near zero; the same
    texture standing still, or flickering, is not."""
    other = translating_clip(n=8, shift=3, seed=5)
    moving = warp_error(other, clip)["warp_error"]
    static = warp_error(np.repeat(other[:1], 8, axis=0), clip)["warp_error"]
    flickering = warp_error(flicker(other), clip)["warp_error"]
    # Measured: ~2e-4 same motion, ~1e-2 standing still, ~1e-2 flickering
    assert moving < 1e-3
    assert static > 10 * moving and flickering > 10 * moving


# --- SSIM and masked PSNR -------------------------------------------------------------------------


def _noisy_pair(seed: int = 0, shape=(2, 40, 48, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
    return a, b


def test_ssim_map_against_the_formula_by_hand() -> None:
    """Wang et al. (2004) at single pixels, windows summed explicitly with the normalised Gaussian."""
    a, b = _noisy_pair()
    x, y = a[0].astype(np.float64), b[0].astype(np.float64)
    r, sigma = SSIM_RADIUS, 1.5
    g1 = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    g = np.outer(g1, g1) / g1.sum() ** 2
    got = ssim_map(a[0], b[0])
    for (i, j, c) in [(5, 5, 0), (20, 17, 1), (34, 42, 2)]:
        wx, wy = x[i - r:i + r + 1, j - r:j + r + 1, c], y[i - r:i + r + 1, j - r:j + r + 1, c]
        mx, my = (g * wx).sum(), (g * wy).sum()
        vx, vy = (g * wx * wx).sum() - mx**2, (g * wy * wy).sum() - my**2
        cov = (g * wx * wy).sum() - mx * my
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        assert got[i, j, c] == pytest.approx(expected, abs=1e-12)


def test_masked_ssim_without_mask_is_skimage() -> None:
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image not installed (pip install 'tokenflow-video[dev]')")
    a, b = _noisy_pair(1)
    expected = np.mean([metrics.structural_similarity(a[i], b[i], channel_axis=2, data_range=255, gaussian_weights=True,
                                                      sigma=1.5, use_sample_covariance=False) for i in range(len(a))])
    assert masked_ssim(a, b) == pytest.approx(expected, abs=1e-12)
    assert masked_ssim(a, a) == 1.0


def test_masks_select_the_right_pixels() -> None:
    """Changes inside the object mask never move the background scores; changes outside do, as computed by hand."""
    a, b = _noisy_pair(2)
    mask = np.zeros(a.shape[:3], bool)
    mask[:, 10:25, 12:30] = True
    other = b.copy()
    other[mask] = 255 - other[mask]  # a different edit of the object only
    bg = ~mask
    mse = [((a[i].astype(float) - b[i].astype(float))[bg[i]] ** 2).mean() for i in range(len(a))]
    expected = np.mean([10 * math.log10(255**2 / m) for m in mse])
    assert masked_psnr(b, a, bg) == pytest.approx(expected, rel=1e-12)
    assert masked_psnr(other, a, bg) == masked_psnr(b, a, bg)
    assert psnr(other, a) != pytest.approx(psnr(b, a))  # the object did change
    assert masked_ssim(other, a, mask) == masked_ssim(b, a, mask)
    assert masked_ssim(b, a, mask) < 0.99
    assert masked_psnr(a, a, bg) == math.inf and math.isnan(masked_psnr(b, a, np.zeros_like(mask)))
    # a shared (H, W) mask is the same as one per frame
    assert masked_psnr(b, a, bg[0]) == pytest.approx(masked_psnr(b, a, np.broadcast_to(bg[0], bg.shape)))
    with pytest.raises(VideoError, match="do not fit"):
        masked_psnr(b, a, bg[:, :10])


# --- point tracks --------------------------------------------------------------------------------


def test_tracks_recover_the_translation(clip: np.ndarray) -> None:
    points = good_features(clip[0])
    tracks, valid = lk_tracks(clip, points)
    assert len(points) > 30 and valid.shape == (8, len(points))
    for t in range(1, 8):
        moved = tracks[t][valid[t]] - tracks[0][valid[t]]
        assert valid[t].mean() > 0.6
        assert np.median(moved[:, 0]) == pytest.approx(-3.0 * t, abs=0.1)  # content moves left 3 px per frame
        assert np.median(moved[:, 1]) == pytest.approx(0.0, abs=0.1)
        assert np.quantile(np.abs(moved[:, 0] + 3.0 * t), 0.9) < 0.3  # a few corners drift up to ~1.4 px


def test_track_error_known_answers(clip: np.ndarray) -> None:
    same = track_error(clip, clip)
    assert same["track_epe"] == 0.0 and same["track_kept_fraction"] == 1.0
    assert same["metric_name"] == "track_epe@opencv-lk"
    # A still edit of a moving source: its points stay put, the source's move 3 px per frame
    static = np.repeat(clip[:1], len(clip), axis=0)
    _, valid = lk_tracks(clip, good_features(clip[0]))
    t = np.arange(len(clip))[1:, None]
    expected = (3.0 * t * valid[1:]).sum() / valid[1:].sum()
    assert track_error(static, clip)["track_epe"] == pytest.approx(expected, rel=0.02)
    with pytest.raises(VideoError, match="at least 2 frames"):
        track_error(clip[:1], clip[:1])
