"""Per-frame condition maps for ControlNets, computed once per video from the input frames (OpenCV, no weights).

* ``canny``: OpenCV's Canny edges of the frame's luminance (binary, 1 on an edge), as diffusers' and
  the ControlNet authors' canny examples compute them.
* ``softedge``: the Sobel gradient magnitude of the Gaussian-smoothed luminance, divided by its maximum
  over the whole video (so a static edge keeps its strength in every frame). A soft, graded edge map
  computed without learned weights — **not** HED or PiDiNet, the learned detectors the SoftEdge
  ControlNets were trained on: texture edges stay, lines are not thinned or closed, strengths differ.
* ``maps``: precomputed maps (depth from a monocular depth model, HED, pose...) read from a video file
  or a folder of images, one per frame. Depth needs learned weights that no registry package ships,
  so it is not computed here.

Every map is (N, 3, H, W) float32 in [0, 1] (white = edge / near), the range diffusers' ControlNet
pipelines feed the ControlNet.
"""
from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tokenflow.errors import ConfigError, VideoError

log = logging.getLogger(__name__)


class Condition(str, Enum):
    canny = "canny"        # OpenCV Canny edges
    softedge = "softedge"  # Sobel magnitude of the Gaussian-smoothed frame (not HED)
    maps = "maps"          # precomputed maps from a file or folder


def _gray(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB → (N, H, W) uint8 luminance (OpenCV's RGB2GRAY weights)."""
    import cv2

    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])


def _as_maps(single: np.ndarray) -> Tensor:
    """(N, H, W) float in [0, 1] → (N, 3, H, W) float32 tensor (the channel repeated)."""
    return torch.from_numpy(np.ascontiguousarray(single, dtype=np.float32))[:, None].repeat(1, 3, 1, 1)


def canny(frames: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> Tensor:
    """Canny edges (N, 3, H, W) in {0, 1} of frames (N, H, W, 3) uint8 RGB; thresholds on the 3x3 Sobel L1 gradient."""
    import cv2

    edges = np.stack([cv2.Canny(g, low_threshold, high_threshold) for g in _gray(frames)])
    return _as_maps(edges / 255.0)


def soft_edges(frames: np.ndarray, sigma: float = 2.0) -> Tensor:
    """Soft edges (N, 3, H, W) in [0, 1]: |Sobel| of the luminance smoothed with a Gaussian of ``sigma`` px,
    divided by the video's maximum (all zeros for a flat video)."""
    import cv2

    out = []
    for g in _gray(frames):
        smooth = cv2.GaussianBlur(g.astype(np.float32) / 255.0, (0, 0), sigma)
        gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
        out.append(np.sqrt(gx * gx + gy * gy))
    magnitude = np.stack(out)
    peak = float(magnitude.max())
    return _as_maps(magnitude / peak if peak > 0 else magnitude)


def read_maps(path: str, n_frames: int, height: int, width: int) -> Tensor:
    """Precomputed maps (N, 3, H, W) in [0, 1] from a video or a folder of images, resized to the frames' size."""
    from tokenflow.storage.video import read_video

    if not Path(path).expanduser().exists():
        raise ConfigError(f"condition maps '{path}' do not exist — give a video or a folder of images, one map per frame")
    try:
        maps = read_video(str(Path(path).expanduser()), height=height, width=width)
    except VideoError as e:
        raise ConfigError(f"cannot read condition maps '{path}': {e}") from e
    if maps.n_frames != n_frames:
        raise ConfigError(f"condition maps '{path}' have {maps.n_frames} frames but the video has {n_frames} — "
                          "give one map per edited frame (after n_frames/frame_stride)")
    return torch.from_numpy(maps.frames).permute(0, 3, 1, 2).float() / 255.0


def condition_maps(kind: Condition | str, frames: np.ndarray, *, low_threshold: int = 100, high_threshold: int = 200,
                   sigma: float = 2.0, maps: str | None = None) -> Tensor:
    """The ``kind`` maps (N, 3, H, W) float32 in [0, 1] of frames (N, H, W, 3) uint8 RGB."""
    kind = Condition(kind)
    if kind is Condition.canny:
        return canny(frames, low_threshold, high_threshold)
    if kind is Condition.softedge:
        return soft_edges(frames, sigma)
    if maps is None:
        raise ConfigError("condition=maps needs maps=path/to/maps.mp4 (or a folder of images), one per frame")
    return read_maps(maps, frames.shape[0], frames.shape[1], frames.shape[2])


def input_frames(inputs) -> np.ndarray:
    """The input frames (N, H, W, 3) uint8 of an edit: ``EditInputs.frames`` when the pipeline passes them,
    else the VAE decoding of the encoded frames ``inversion.clean`` (logged: a slightly blurred copy)."""
    frames = inputs.frames  # None when the caller passed no video
    if frames is not None:
        return np.asarray(frames)
    from tokenflow.storage.video import frames_from_tensor

    log.info("condition maps: no input frames were passed to the editor; decoding inversion.clean with the VAE "
             "and computing the maps on that reconstruction")
    return frames_from_tensor(inputs.model.decode_latents(inputs.inversion.clean))
