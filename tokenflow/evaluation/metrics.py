"""Weight-free video metrics: PSNR, SSIM (optionally inside a pixel mask), flow-warping error with OpenCV
optical flow, and Lucas-Kanade point tracks.

The warp error here uses classical OpenCV flow (Farneback or DIS) on the *source* video, and the tracks
are OpenCV pyramidal Lucas-Kanade. Their numbers are NOT comparable with the RAFT / CoTracker based
figures reported in papers (TokenFlow, Text2Video-Zero, FiVE-Bench, ...); compare methods only with the
same ``metric_name``. The metric interface is :mod:`tokenflow.evaluation.interface`, the metrics selected by
config :mod:`tokenflow.evaluation.weight_free` (these) and :mod:`tokenflow.evaluation.model_metrics` (CLIP, DINO).
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import torch

from tokenflow.core.optical_flow import UNFLOW_ALPHA, UNFLOW_BETA, FlowMethod, gray_frame, consistent_pixels, optical_flow
from tokenflow.errors import ConfigError, VideoError

FLOW_METHODS = tuple(m.value for m in FlowMethod)
__all__ = ["optical_flow", "consistent_pixels", "UNFLOW_ALPHA", "UNFLOW_BETA", "FLOW_METHODS"]  # re-exported here


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
        valid = consistent_pixels(f_bwd, f_fwd, UNFLOW_ALPHA, UNFLOW_BETA)  # on t+1's grid
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


# --- masked PSNR / SSIM --------------------------------------------------------------------------

SSIM_SIGMA = 1.5   # Wang et al. (2004) Gaussian window, as skimage's gaussian_weights=True
SSIM_RADIUS = 5    # 11x11 window: skimage's int(3.5 * sigma + 0.5)
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """(H, W, C) float64 local SSIM of two (H, W, C) frames (Wang et al. 2004).

    Gaussian window sigma 1.5 truncated at radius 5 (11x11), population covariances, K1 = 0.01,
    K2 = 0.03: skimage's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=2, full=True)``, computed with OpenCV. Values within 5
    px of the border depend on the border rule; :func:`masked_ssim` leaves them out, as skimage does.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    g = cv2.getGaussianKernel(2 * SSIM_RADIUS + 1, SSIM_SIGMA, cv2.CV_64F)

    def blur(img: np.ndarray) -> np.ndarray:
        out = cv2.sepFilter2D(img, cv2.CV_64F, g, g, borderType=cv2.BORDER_REFLECT)
        return out.reshape(img.shape)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def as_masks(masks: Any, n: int, hw: tuple[int, int]) -> np.ndarray:
    """Object masks as (n, H, W) bool: accepts (H, W) (shared by all frames), (n, H, W) or (n, H, W, 1|3);
    bool or numbers (nonzero = object)."""
    m = np.asarray(masks)
    if m.ndim == 4 and m.shape[-1] in (1, 3):
        m = m[..., 0]
    if m.ndim == 2:
        m = np.broadcast_to(m, (n, *m.shape))
    if m.ndim != 3 or m.shape[0] != n or m.shape[1:] != tuple(hw):
        raise VideoError(f"masks of shape {np.asarray(masks).shape} do not fit {n} frames of {hw[0]}x{hw[1]} — pass "
                         "(H, W) or (N, H, W) object masks at the video's size")
    return m.astype(bool)


def masked_psnr(a: Any, b: Any, keep: Any, data_range: float = 255.0) -> float:
    """Mean over frames of the PSNR (dB) of the pixels where ``keep`` is True, for (N, H, W, 3) frames.

    Per frame: MSE over the kept pixels (all channels, float64), PSNR = 10 log10(data_range^2 / MSE).
    Frames with no kept pixel are skipped (``nan`` when none remain); identical frames follow
    :func:`psnr`'s policy (left out of the mean, ``inf`` when all are identical).
    """
    x, y = _frames(a, "a").astype(np.float64), _frames(b, "b").astype(np.float64)
    if x.shape != y.shape:
        raise VideoError(f"masked_psnr inputs differ in shape: {x.shape} vs {y.shape} — pass frames of the same size")
    k = as_masks(keep, x.shape[0], x.shape[1:3])
    mses = [float(((x[i] - y[i])[k[i]] ** 2).mean()) for i in range(len(x)) if k[i].any()]
    if not mses:
        return math.nan
    finite = [m for m in mses if m > 0]
    if not finite:
        return math.inf
    return float(np.mean([10.0 * math.log10(data_range**2 / m) for m in finite]))


def masked_ssim(a: Any, b: Any, exclude: Any | None = None, data_range: float = 255.0) -> float:
    """Mean over frames of the mean local SSIM (:func:`ssim_map`, channels averaged) over the pixels whose
    whole 11x11 window lies inside the frame and outside ``exclude`` (e.g. the edited object).

    So nothing inside ``exclude`` can change the result; with no mask it is skimage's mean SSIM.
    Frames without such a pixel are skipped (``nan`` when none remain).
    """
    x, y = _frames(a, "a"), _frames(b, "b")
    if x.shape != y.shape:
        raise VideoError(f"masked_ssim inputs differ in shape: {x.shape} vs {y.shape} — pass frames of the same size")
    n, h, w = x.shape[:3]
    ex = np.zeros((n, h, w), bool) if exclude is None else as_masks(exclude, n, (h, w))
    kernel = np.ones((2 * SSIM_RADIUS + 1,) * 2, np.uint8)
    interior = np.zeros((h, w), bool)
    interior[SSIM_RADIUS:h - SSIM_RADIUS, SSIM_RADIUS:w - SSIM_RADIUS] = True
    values = []
    for i in range(n):
        valid = interior & ~cv2.dilate(ex[i].astype(np.uint8), kernel).astype(bool)
        if valid.any():
            values.append(float(ssim_map(x[i], y[i], data_range)[valid].mean()))
    return float(np.mean(values)) if values else math.nan


# --- point tracks ---------------------------------------------------------------------------------

TRACK_METHOD = "opencv-lk"
LK_WINDOW, LK_LEVELS, FB_THRESHOLD = 21, 3, 1.0


def good_features(frame: np.ndarray, max_points: int = 400, mask: np.ndarray | None = None) -> np.ndarray:
    """(P, 2) float32 (x, y) Shi-Tomasi corners of an (H, W, 3) uint8 frame (``cv2.goodFeaturesToTrack``,
    quality 0.01, min distance 5 px, block 7), optionally only where ``mask`` (H, W) is True."""
    m = None if mask is None else np.asarray(mask, bool).astype(np.uint8) * 255
    pts = cv2.goodFeaturesToTrack(gray_frame(frame), maxCorners=max_points, qualityLevel=0.01, minDistance=5,
                                  blockSize=7, mask=m)
    return np.zeros((0, 2), np.float32) if pts is None else pts.reshape(-1, 2).astype(np.float32)


def lk_tracks(frames: Any, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Track ``points`` (P, 2) (x, y) from frame 0 through (N, H, W, 3) uint8 frames, frame to frame.

    Pyramidal Lucas-Kanade (21x21 window, 3 levels) with a forward-backward check: a point is lost for
    good once LK fails, it leaves the frame, or tracking it back lands more than 1 px from where it
    started. Returns positions (N, P, 2) float32 and validity (N, P) bool (row 0: the points, all valid).
    """
    video = _frames(frames, "frames")
    pts = np.asarray(points, np.float32).reshape(-1, 2)
    n, h, w = video.shape[:3]
    tracks, valid = np.zeros((n, len(pts), 2), np.float32), np.zeros((n, len(pts)), bool)
    tracks[0], valid[0] = pts, True
    if len(pts) == 0:
        return tracks, valid
    lk = dict(winSize=(LK_WINDOW, LK_WINDOW), maxLevel=LK_LEVELS,
              criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    prev = gray_frame(video[0])
    for t in range(1, n):
        cur = gray_frame(video[t])
        p0 = tracks[t - 1].reshape(-1, 1, 2)
        p1, ok1, _ = cv2.calcOpticalFlowPyrLK(prev, cur, p0, None, **lk)
        back, ok2, _ = cv2.calcOpticalFlowPyrLK(cur, prev, p1, None, **lk)
        p1, back = p1.reshape(-1, 2), back.reshape(-1, 2)
        fb = np.linalg.norm(back - tracks[t - 1], axis=1)
        inside = (p1[:, 0] >= 0) & (p1[:, 0] <= w - 1) & (p1[:, 1] >= 0) & (p1[:, 1] <= h - 1)
        valid[t] = valid[t - 1] & ok1.ravel().astype(bool) & ok2.ravel().astype(bool) & (fb < FB_THRESHOLD) & inside
        tracks[t] = np.where(valid[t][:, None], p1, tracks[t - 1])  # a lost point stays where it was last seen
        prev = cur
    return tracks, valid


def track_error(edited: Any, source: Any, max_points: int = 400) -> dict[str, Any]:
    """Motion fidelity from point tracks: do the source's points move the same way in the edit?

    Shi-Tomasi corners of source frame 0 (:func:`good_features`) are tracked through the source and,
    from the same start points, through the edit (:func:`lk_tracks`). ``track_epe``: mean distance in
    pixels between the two tracks over every (point, frame >= 1) tracked in both; ``track_kept_fraction``:
    the share of the source's tracked (point, frame >= 1) pairs the edit also tracks. ``nan`` when no
    pair is left. Returns those two, ``points`` and ``metric_name`` (``track_epe@opencv-lk``).
    """
    ed, src = _frames(edited, "edited"), _frames(source, "source")
    if ed.shape != src.shape:
        raise VideoError(f"edited frames {ed.shape} and source frames {src.shape} differ in shape — resize the edit to the source size")
    if src.shape[0] < 2:
        raise VideoError(f"track_error needs at least 2 frames, got {src.shape[0]} — pass a longer clip")
    pts = good_features(src[0], max_points)
    s_tr, s_ok = lk_tracks(src, pts)
    e_tr, e_ok = lk_tracks(ed, pts)
    both = (s_ok & e_ok)[1:]
    dist = np.linalg.norm(e_tr - s_tr, axis=-1)[1:]
    source_pairs = int(s_ok[1:].sum())
    return {
        "track_epe": float(dist[both].mean()) if both.any() else math.nan,
        "track_kept_fraction": float(both.sum() / source_pairs) if source_pairs else math.nan,
        "points": int(len(pts)),
        "metric_name": f"track_epe@{TRACK_METHOD}",
    }


# --- helpers -----------------------------------------------------------------------------------


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def as_frames(x: Any, name: str = "frames") -> np.ndarray:
    """(N, H, W, 3) uint8 frames of an array or a :class:`~tokenflow.storage.video.Video`; a VideoError otherwise."""
    return _frames(x, name)


def _frames(x: Any, name: str) -> np.ndarray:
    frames = getattr(x, "frames", x)
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"{name} must be (N, H, W, 3) uint8 frames, got shape {getattr(frames, 'shape', None)} dtype {getattr(frames, 'dtype', None)} — use Video.frames or frames_from_tensor")
    return frames


def _remap(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """Bilinear sample ``img`` (H, W, C) float32 at (map_x, map_y); outside reads as 0 (masked later)."""
    return cv2.remap(img, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
