"""Weight-free video metrics: PSNR and flow-warping error with OpenCV optical flow.

The warp error here uses classical OpenCV flow (Farneback or DIS) on the *source* video. Its numbers
are NOT comparable with the RAFT-based warp errors reported in papers (TokenFlow, Text2Video-Zero,
...); compare methods only with the same ``metric_name``.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import torch

from tokenflow.errors import ConfigError, VideoError

FLOW_METHODS = ("farneback", "dis")
UNFLOW_ALPHA = 0.01
UNFLOW_BETA = 0.5


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 255.0) -> float:
    """Mean over frames of per-frame PSNR in dB, for (N, H, W, C) or a single (H, W, C) frame.

    Computed in float64 (uint8 inputs never wrap). Use ``data_range=255`` for uint8, ``1`` for [0, 1]
    and ``2`` for [-1, 1] tensors; layout only needs to match between ``a`` and ``b``.
    Identical frames have infinite PSNR: the result is ``inf`` only when *all* frames are identical;
    otherwise it is the mean over the frames that differ (identical frames are left out, not capped).
    """
    x, y = _as_float64(a), _as_float64(b)
    if x.shape != y.shape:
        raise ConfigError(f"psnr inputs differ in shape: {x.shape} vs {y.shape} — pass arrays of the same shape")
    if data_range <= 0:
        raise ConfigError(f"data_range={data_range} must be positive — use 255 for uint8, 1 or 2 for floats")
    if x.ndim == 3:
        x, y = x[None], y[None]
    mse = ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    finite = mse[mse > 0]
    if finite.size == 0:
        return float("inf")
    return float(np.mean(10.0 * np.log10(data_range**2 / finite)))


def optical_flow(src_frame: np.ndarray, dst_frame: np.ndarray, method: str = "farneback") -> np.ndarray:
    """Dense flow (H, W, 2) float32 (dx, dy) from ``src_frame`` to ``dst_frame``, on grayscale.

    Frames are (H, W, 3) uint8 RGB or (H, W) uint8 gray; ``src(p) ~ dst(p + flow(p))``.
    ``method``: "farneback" (cv2.calcOpticalFlowFarneback) or "dis" (cv2 DIS, medium preset).
    """
    src, dst = _gray(src_frame), _gray(dst_frame)
    if src.shape != dst.shape:
        raise VideoError(f"flow frames differ in size: {src.shape} vs {dst.shape} — resize them to match")
    if method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(src, dst, None, pyr_scale=0.5, levels=5, winsize=15,
                                            iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    elif method == "dis":
        flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(src, dst, None)
    else:
        raise ConfigError(f"flow method={method!r} is unknown — use one of {', '.join(FLOW_METHODS)}")
    return np.asarray(flow, dtype=np.float32)


def warp_metric_name(method: str = "farneback") -> str:
    """Name that says which flow produced a warp error, e.g. ``warp_error@opencv-farneback``."""
    return f"warp_error@opencv-{method}"


def warp_error(edited: Any, source: Any, method: str = "farneback") -> dict[str, Any]:
    """Flow-warping error of ``edited`` frames, with flow estimated on the ``source`` frames.

    Both are (N, H, W, 3) uint8 arrays (or :class:`tokenflow.storage.video.Video`), N >= 2, same shape.
    For each pair (t, t+1): forward flow t->t+1 and backward flow t+1->t on the source; edited frame
    t is warped onto frame t+1's grid with the backward flow (``cv2.remap``, bilinear). Pixels failing
    the UnFlow forward-backward check ``|f_b + f_f(w)|^2 < 0.01 (|f_b|^2 + |f_f(w)|^2) + 0.5`` or
    sampling outside the frame are occluded. The pair error is the MSE over non-occluded pixels on
    float RGB in [0, 1]; results are averaged over pairs (pairs with no valid pixel are skipped;
    ``nan`` if none remain). Not comparable with RAFT-based figures in papers.

    Returns ``{"warp_error", "occluded_fraction", "flow": "opencv-<method>", "pairs", "metric_name"}``.
    """
    if method not in FLOW_METHODS:
        raise ConfigError(f"flow method={method!r} is unknown — use one of {', '.join(FLOW_METHODS)}")
    ed, src = _frames(edited, "edited"), _frames(source, "source")
    if ed.shape != src.shape:
        raise VideoError(f"edited frames {ed.shape} and source frames {src.shape} differ in shape — resize the edit to the source size")
    if src.shape[0] < 2:
        raise VideoError(f"warp_error needs at least 2 frames, got {src.shape[0]} — pass a longer clip")
    h, w = src.shape[1:3]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    errors, occluded = [], []
    for t in range(src.shape[0] - 1):
        f_fwd = optical_flow(src[t], src[t + 1], method)  # on t's grid
        f_bwd = optical_flow(src[t + 1], src[t], method)  # on t+1's grid
        map_x, map_y = grid_x + f_bwd[..., 0], grid_y + f_bwd[..., 1]
        warped = _remap(ed[t].astype(np.float32) / 255.0, map_x, map_y)
        f_fwd_w = _remap(f_fwd, map_x, map_y)
        lhs = _sq_norm(f_bwd + f_fwd_w)
        consistent = lhs < UNFLOW_ALPHA * (_sq_norm(f_bwd) + _sq_norm(f_fwd_w)) + UNFLOW_BETA
        inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
        valid = consistent & inside
        occluded.append(1.0 - float(valid.mean()))
        if valid.any():
            diff = warped - ed[t + 1].astype(np.float32) / 255.0
            errors.append(float((diff[valid] ** 2).mean()))
    return {
        "warp_error": float(np.mean(errors)) if errors else math.nan,
        "occluded_fraction": float(np.mean(occluded)),
        "flow": f"opencv-{method}",
        "pairs": src.shape[0] - 1,
        "metric_name": warp_metric_name(method),
    }


# --- helpers -----------------------------------------------------------------------------------


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _frames(x: Any, name: str) -> np.ndarray:
    frames = getattr(x, "frames", x)
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"{name} must be (N, H, W, 3) uint8 frames, got shape {getattr(frames, 'shape', None)} dtype {getattr(frames, 'dtype', None)} — use Video.frames or frames_from_tensor")
    return frames


def _gray(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[-1] != 3):
        raise VideoError(f"flow needs (H, W, 3) or (H, W) uint8 frames, got shape {frame.shape} dtype {frame.dtype} — convert with .astype(np.uint8)")
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame


def _sq_norm(flow: np.ndarray) -> np.ndarray:
    """(H, W, 2) -> (H, W) squared flow magnitude."""
    return (flow**2).sum(axis=-1)


def _remap(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """Bilinear sample ``img`` (H, W, C) float32 at (map_x, map_y); outside reads as 0 (masked later)."""
    return cv2.remap(img, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
