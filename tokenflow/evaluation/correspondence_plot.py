"""Pictures of a :class:`~tokenflow.evaluation.correspondence.CorrespondenceField` (arrays and matplotlib figures).

Nothing here calls ``pyplot``: figures are plain :class:`matplotlib.figure.Figure` objects, so no global
figure state is touched; display them in Jupyter with ``display(fig)`` or save with ``fig.savefig``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tokenflow.evaluation.correspondence import CorrespondenceField


def _colours(coords: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h, w, 2) (y, x) coordinates → (h, w, 3) float32 RGB: red = x, green = y, blue = 0.5."""
    h, w = grid
    rgb = np.empty(coords.shape[:2] + (3,), dtype=np.float32)
    rgb[..., 0] = coords[..., 1] / max(w - 1, 1)
    rgb[..., 1] = coords[..., 0] / max(h - 1, 1)
    rgb[..., 2] = 0.5
    return rgb


def identity_colormap(field: "CorrespondenceField") -> np.ndarray:
    """(h, w, 3) float32 in [0, 1]: the colour code of every token position (a keyframe's own map)."""
    return _colours(field.identity().numpy(), field.grid)


def coordinate_colormap(field: "CorrespondenceField", frame: int, keyframe: int) -> np.ndarray:
    """(h, w, 3) float32 in [0, 1]: each token of ``frame`` coloured by its source (y, x) in ``keyframe``.

    Same code as :func:`identity_colormap` (red = x, green = y): where the two maps agree, the token
    did not move. ``frame`` and ``keyframe`` are global frame indices.
    """
    f, k = field.position(frame, keyframe)
    return _colours(field.coordinates()[f, k].numpy(), field.grid)


def similarity_heatmap(field: "CorrespondenceField", frame: int, keyframe: int) -> np.ndarray:
    """(h, w) float32: cosine similarity of each token of ``frame`` to its match in ``keyframe``."""
    f, k = field.position(frame, keyframe)
    return field.similarity[f, k].reshape(field.grid).numpy().astype(np.float32)


def warp_keyframe(field: "CorrespondenceField", keyframe_image: np.ndarray, frame: int, keyframe: int) -> np.ndarray:
    """``keyframe_image`` (H, W, 3) uint8 re-arranged token by token along the field → (H, W, 3) uint8.

    Every pixel of the output lies in one token of ``frame``; it takes the pixel at the same offset inside
    the matched token of the keyframe (nearest-token upsampling of the field to the image size). For a
    correct field this approximates ``frame``'s image.
    """
    img = np.asarray(keyframe_image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"keyframe_image must be (H, W, 3), got {img.shape}")
    f, k = field.position(frame, keyframe)
    h, w = field.grid
    H, W = img.shape[:2]
    coords = field.coordinates()[f, k].numpy()  # (h, w, 2)
    uy, ux = (np.arange(H) + 0.5) * h / H, (np.arange(W) + 0.5) * w / W  # pixel centres in token units
    ty, tx = np.minimum(uy.astype(int), h - 1), np.minimum(ux.astype(int), w - 1)
    src = coords[ty[:, None], tx[None, :]]  # (H, W, 2) source token of every pixel
    sy = np.clip(((src[..., 0] + (uy - ty)[:, None]) * H / h).astype(int), 0, H - 1)
    sx = np.clip(((src[..., 1] + (ux - tx)[None, :]) * W / w).astype(int), 0, W - 1)
    return img[sy, sx]


def plot_field(field: "CorrespondenceField", video: Any, frame: int, keyframe: int,
               figsize: tuple[float, float] = (12.0, 7.5)) -> "Figure":
    """Figure with six panels: frame, keyframe, keyframe colour code, frame's source colour code,
    keyframe warped by the field, similarity heatmap (+ colourbar).

    video: a :class:`~tokenflow.storage.video.Video` or frames (N, H, W, 3) uint8, indexed by global frame index.
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 -- optional at import time

    frames = np.asarray(getattr(video, "frames", video))
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(2, 3)
    sim = similarity_heatmap(field, frame, keyframe)
    panels = [
        (frames[frame], f"frame {frame}"),
        (frames[keyframe], f"keyframe {keyframe}"),
        (identity_colormap(field), f"keyframe {keyframe}: token (y, x) colours"),
        (coordinate_colormap(field, frame, keyframe), f"frame {frame}: source token in keyframe"),
        (warp_keyframe(field, frames[keyframe], frame, keyframe), "keyframe warped by the field"),
    ]
    for ax, (image, title) in zip(axes.flat, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    im = axes.flat[5].imshow(sim, cmap="viridis", interpolation="nearest")
    axes.flat[5].set_title("cosine similarity of the match", fontsize=9)
    fig.colorbar(im, ax=axes.flat[5], shrink=0.8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{field.layer} @ t={field.timestep}, grid {field.grid[0]}x{field.grid[1]}", fontsize=10)
    return fig
