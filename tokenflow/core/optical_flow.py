"""Dense optical flow and the forward-backward check: the one place both the flow propagator
(:mod:`tokenflow.core.flow_propagation`) and the warp-error metric (:mod:`tokenflow.evaluation.metrics`) take them from.

Classical OpenCV flow (Farnebäck or DIS, on grayscale) — not RAFT, so figures computed with it are not comparable
with papers' RAFT-based ones. The occlusion test is UnFlow's (Meister et al. 2018): a pixel p is consistent when
``|f(p) + g(p + f(p))|² < α(|f(p)|² + |g(p + f(p))|²) + β`` for its flow f and the reverse flow g read bilinearly at
``p + f(p)``, and ``p + f(p)`` lands inside the frame.
"""
from __future__ import annotations

from enum import Enum

import cv2
import numpy as np

from tokenflow.errors import ConfigError, VideoError

UNFLOW_ALPHA = 0.01   # UnFlow's constants
UNFLOW_BETA = 0.5     # pixels²


class FlowMethod(str, Enum):
    farneback = "farneback"   # cv2.calcOpticalFlowFarneback (pyramid 0.5 × 5 levels, window 15)
    dis = "dis"               # cv2 DIS optical flow, medium preset


def optical_flow(src_frame: np.ndarray, dst_frame: np.ndarray, method: FlowMethod | str = FlowMethod.farneback
                 ) -> np.ndarray:
    """Dense flow (H, W, 2) float32 (dx, dy) from ``src_frame`` to ``dst_frame``, on grayscale:
    ``src(p) ≈ dst(p + flow(p))``. Frames are (H, W, 3) uint8 RGB or (H, W) uint8 gray."""
    try:
        method = FlowMethod(method)
    except ValueError:
        raise ConfigError(f"flow method={method!r} is unknown — use one of "
                          f"{', '.join(m.value for m in FlowMethod)}") from None
    src, dst = gray_frame(src_frame), gray_frame(dst_frame)
    if src.shape != dst.shape:
        raise VideoError(f"flow frames differ in size: {src.shape} vs {dst.shape} — resize them to match")
    if method is FlowMethod.farneback:
        flow = cv2.calcOpticalFlowFarneback(src, dst, None, pyr_scale=0.5, levels=5, winsize=15,
                                            iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    else:
        flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(src, dst, None)
    return np.asarray(flow, dtype=np.float32)


def consistent_pixels(forward: np.ndarray, backward: np.ndarray, alpha: float = UNFLOW_ALPHA,
                      beta: float = UNFLOW_BETA) -> np.ndarray:
    """(H, W) bool: the pixels of ``forward``'s grid that pass the forward-backward check and land inside.

    forward (H, W, 2): this grid → the other frame; backward (H, W, 2): the other frame → this grid, on the other
    frame's grid, read bilinearly at ``p + forward(p)``. Samples outside the frame fail ``inside``, so the border
    rule of that read never decides a result (a bilinear read inside [0, W-1] x [0, H-1] gives weight 0 to any
    neighbour past the edge).
    """
    h, w = forward.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = gx + forward[..., 0], gy + forward[..., 1]
    back = cv2.remap(np.ascontiguousarray(backward), map_x, map_y, interpolation=cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)
    ok = _sq_norm(forward + back) < alpha * (_sq_norm(forward) + _sq_norm(back)) + beta
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return ok & inside


def gray_frame(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[-1] != 3):
        raise VideoError(f"flow needs (H, W, 3) or (H, W) uint8 frames, got shape {frame.shape} dtype {frame.dtype} — "
                         "convert with .astype(np.uint8)")
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame


def _sq_norm(flow: np.ndarray) -> np.ndarray:
    """(H, W, 2) → (H, W) squared flow magnitude."""
    return (flow ** 2).sum(axis=-1)
