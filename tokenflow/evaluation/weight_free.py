"""The metrics without weights: warp error (OpenCV flow), point-track motion fidelity (OpenCV Lucas-Kanade),
background PSNR/SSIM outside object masks; each with its ``Config`` dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenflow.core.optical_flow import FlowMethod
from tokenflow.errors import ConfigError
from tokenflow.evaluation.interface import VideoMetric
from tokenflow.evaluation.metrics import (TRACK_METHOD, as_frames, as_masks, masked_psnr, masked_ssim, track_error,
                                          warp_error)
from tokenflow.options import choice


@dataclass
class WarpConfig:
    method: FlowMethod = FlowMethod.farneback   # OpenCV flow estimated on the source video

    def __post_init__(self) -> None:
        self.method = choice(FlowMethod, self.method, "metrics.warp.method")


class WarpErrorMetric(VideoMetric):
    """Flow-warping error (Lai et al. 2018) with OpenCV flow on the source; wraps :func:`metrics.warp_error`."""

    name = "warp"
    Config = WarpConfig

    def __init__(self, **config: Any) -> None:
        self.config = WarpConfig(**config)

    @property
    def definitions(self) -> dict[str, str]:
        m = self.config.method.value
        return {
            f"warp_error@opencv-{m}": (
                f"mean over consecutive pairs (t, t+1) of the MSE (float RGB in [0, 1]) between edited frame t+1 and "
                f"edited frame t warped onto it (cv2.remap, bilinear) with the backward flow t+1->t estimated on the "
                f"SOURCE video by OpenCV {m}; pixels failing the UnFlow forward-backward check (alpha=0.01, beta=0.5) "
                "or sampling outside the frame are left out. Not comparable with RAFT-based figures"),
            f"warp_occluded_fraction@opencv-{m}": f"mean over pairs of the share of pixels left out of warp_error@opencv-{m}",
        }

    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        if as_frames(source).shape[0] < 2:
            return {}
        m = self.config.method.value
        w = warp_error(edited, source, m)
        return {f"warp_error@opencv-{m}": w["warp_error"], f"warp_occluded_fraction@opencv-{m}": w["occluded_fraction"]}


@dataclass
class TrackConfig:
    max_points: int = 400   # Shi-Tomasi corners of source frame 0 to track

    def __post_init__(self) -> None:
        if self.max_points < 1:
            raise ConfigError(f"metrics.tracks.max_points={self.max_points} must be >= 1 — e.g. 400")


class TrackMetric(VideoMetric):
    """Motion fidelity from OpenCV Lucas-Kanade point tracks; wraps :func:`metrics.track_error`."""

    name = "tracks"
    Config = TrackConfig

    def __init__(self, **config: Any) -> None:
        self.config = TrackConfig(**config)

    @property
    def definitions(self) -> dict[str, str]:
        t = TRACK_METHOD
        return {
            f"track_epe@{t}": (
                f"mean endpoint distance in pixels between where up to {self.config.max_points} Shi-Tomasi corners of "
                "source frame 0 are tracked in the source and, from the same start points, in the edit (OpenCV "
                "pyramidal Lucas-Kanade 21x21, 3 levels, frame to frame, lost for good after a forward-backward error "
                "> 1 px or leaving the frame), over every (point, frame >= 1) tracked in both; lower = motion kept"),
            f"track_kept_fraction@{t}": "share of the source's tracked (point, frame >= 1) pairs that the edit also tracks",
        }

    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        if as_frames(source).shape[0] < 2:
            return {}
        r = track_error(edited, source, self.config.max_points)
        return {f"track_epe@{TRACK_METHOD}": r["track_epe"], f"track_kept_fraction@{TRACK_METHOD}": r["track_kept_fraction"]}


@dataclass
class BackgroundConfig:
    pass


class BackgroundMetric(VideoMetric):
    """Background preservation outside the object masks: PSNR and SSIM against the source (needs masks)."""

    name = "background"
    Config = BackgroundConfig

    def __init__(self, **config: Any) -> None:
        self.config = BackgroundConfig(**config)

    @property
    def definitions(self) -> dict[str, str]:
        return {
            "background_psnr": ("mean over frames of 10 log10(255^2 / MSE), the MSE over the RGB values of the pixels "
                                "outside the object mask (edit vs source, uint8 scale); frames with no background or no "
                                "difference are left out"),
            "background_ssim": ("mean over frames of the mean local SSIM (Gaussian 11x11 window, sigma 1.5, K1=0.01, "
                                "K2=0.03, channels averaged; skimage's definition) over the pixels whose whole window lies "
                                "inside the frame and outside the object mask"),
        }

    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        if masks is None:
            return {}
        src = as_frames(source)
        m = as_masks(masks, src.shape[0], src.shape[1:3])
        return {"background_psnr": masked_psnr(edited, src, ~m), "background_ssim": masked_ssim(edited, src, m)}
