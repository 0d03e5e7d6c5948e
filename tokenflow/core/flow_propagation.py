"""Optical-flow propagation: keyframes' self-attention outputs warped to each frame along the input video's flow.

An alternative to TokenFlow's nearest-neighbour correspondences, written only against the
:class:`~tokenflow.core.propagation.Propagator` interface. :meth:`FlowPropagator.prepare` estimates
dense flow (OpenCV DIS or Farnebäck) at the frame resolution for every (frame, keyframe) pair the
schedule uses, in both directions, and keeps per pair (cached on disk, keyed by the frames' content
and the flow settings):

* the flow frame → keyframe averaged over each latent cell, in latent cells, (2, h, w);
* the fraction of each cell's pixels that pass the forward-backward check (UnFlow:
  ``|f + b(p + f)|² < α(|f|² + |b(p + f)|²) + β``) and land inside the keyframe, (h, w).

Per layer, both are averaged over each token's cells (for SD token grids a token is a whole block of
latent cells, so this equals averaging over the token's pixels) and the keyframe output is sampled
bilinearly at ``token + flow`` (``grid_sample``, ``align_corners=False``: token j's centre is at
``(2j + 1)/w - 1``; samples past the border take the border token). The previous and next keyframe are
blended with the paper's weights (:func:`~tokenflow.core.propagation.paper_blend`).

**Occlusions.** A token is consistent with a keyframe when at least ``min_consistent`` of its pixels
pass the check. A token inconsistent with one keyframe takes the other alone (weights renormalised).
A token inconsistent with every keyframe it blends (both, or the only one beyond the first/last
keyframe) falls back to ``fallback``: ``blend`` (default) uses the bilinear samples with the paper's
weights anyway, ``nearest`` the sample of the temporally nearest keyframe (the previous on a tie).
A frame that is itself the keyframe takes its output unchanged (so the keyframe pass is reused).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import Tensor

from tokenflow.core.optical_flow import UNFLOW_ALPHA, UNFLOW_BETA, FlowMethod, consistent_pixels, optical_flow
from tokenflow.core.propagation import PropagationInputs, PropagationQuery, Propagator, SourceFeatures, paper_blend
from tokenflow.digests import frames_fingerprint, json_digest
from tokenflow.errors import ConfigError, VideoError
from tokenflow.options import choice, configured
from tokenflow.paths import default_cache_dir
from tokenflow.atomic import atomic_file, read_safetensors

log = logging.getLogger(__name__)
FLOW_CACHE_FORMAT = 1
Pair = tuple[int, int]  # (frame, keyframe), global indices


class Fallback(str, Enum):
    blend = "blend"           # inconsistent with every keyframe: bilinear samples with the paper's weights anyway
    nearest = "nearest"       # inconsistent with every keyframe: the temporally nearest keyframe's sample alone


class FlowEstimator(Protocol):
    """Dense flow from ``src`` to ``dst`` (H, W, 3) uint8 → (H, W, 2) float32 (dx, dy): src(p) ≈ dst(p + flow(p))."""

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray: ...

    def settings(self) -> dict[str, Any]:
        """What determines the flow (part of the cache key)."""


class OpenCVFlow:
    """OpenCV optical flow on grayscale frames; see :class:`FlowMethod`."""

    def __init__(self, method: FlowMethod | str = FlowMethod.dis) -> None:
        self.method = choice(FlowMethod, method, "propagator.method")

    def settings(self) -> dict[str, Any]:
        return {"estimator": "opencv", "version": cv2.__version__, "method": self.method.value}

    def __call__(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        return optical_flow(src, dst, self.method)


# ---- pure functions: consistency, resampling, sampling grid ---------------------------------------
def resample_flow(flow: Tensor, grid: tuple[int, int]) -> Tensor:
    """Flow (2, H, W) in cells of its own grid → (2, h, w) in cells of ``grid``: mean over each cell's area.

    Cells are averaged like ``adaptive_avg_pool2d`` (exact blocks when h divides H and w divides W).
    """
    (h, w), (src_h, src_w) = grid, flow.shape[-2:]
    pooled = F.adaptive_avg_pool2d(flow[None].float(), (h, w))[0]
    return pooled * torch.tensor([w / src_w, h / src_h], dtype=pooled.dtype, device=pooled.device).view(2, 1, 1)


def sampling_grid(flow: Tensor) -> Tensor:
    """Flow (2, h, w) in tokens → ``grid_sample`` grid (h, w, 2) for ``align_corners=False`` (token j at (2j+1)/w - 1)."""
    _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype, device=flow.device),
                            torch.arange(w, dtype=flow.dtype, device=flow.device), indexing="ij")
    gx = (2 * (xs + flow[0]) + 1) / w - 1
    gy = (2 * (ys + flow[1]) + 1) / h - 1
    return torch.stack([gx, gy], -1)


# ---- the propagator -----------------------------------------------------------------------------
@dataclass
class FlowPropagatorConfig:
    method: FlowMethod = FlowMethod.dis       # optical flow of the input video: dis | farneback
    fallback: Fallback = Fallback.blend       # a token inconsistent with every keyframe it blends: blend | nearest
    min_consistent: float = 0.5               # a token is consistent when >= this fraction of its pixels are (0: no check)
    alpha: float = UNFLOW_ALPHA               # forward-backward check |f + b|² < alpha (|f|² + |b|²) + beta (UnFlow)
    beta: float = UNFLOW_BETA                 # in pixels²
    cache: bool = True                        # keep flows on disk, keyed by the frames' content and these settings
    cache_dir: Optional[str] = None           # None: the library cache dir (flows go to <cache_dir>/flow)

    def __post_init__(self) -> None:
        self.method = choice(FlowMethod, self.method, "propagator.method")
        self.fallback = choice(Fallback, self.fallback, "propagator.fallback")
        if not 0.0 <= self.min_consistent <= 1.0:
            raise ConfigError(f"propagator.min_consistent={self.min_consistent} must be in [0, 1] — a fraction of a "
                              "token's pixels, e.g. 0.5")
        for name in ("alpha", "beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"propagator.{name}={getattr(self, name)} must be >= 0 — UnFlow uses alpha=0.01, beta=0.5")


@dataclass
class PairFlow:
    """One (frame, keyframe) pair at the latent grid: flow (2, h, w) in latent cells, consistent fraction (h, w)."""

    flow: Tensor
    consistent: Tensor


@configured
class FlowPropagator(Propagator):
    """Keyframe self-attention outputs warped along the input video's optical flow; see the module docstring.

    estimator: the flow (default :class:`OpenCVFlow` with ``method``); anything with ``__call__(src, dst)``
    and ``settings()``.
    """

    Config = FlowPropagatorConfig
    uses_keyframes = True  # type: ignore[assignment]
    needs_source = False  # type: ignore[assignment]
    source_features = SourceFeatures.clean  # type: ignore[assignment]

    def __init__(self, estimator: FlowEstimator | None = None, **config: Any) -> None:
        self.config = FlowPropagatorConfig(**config)
        self.estimator = estimator or OpenCVFlow(self.config.method)
        self.pairs: dict[Pair, PairFlow] = {}
        self._fields: dict[tuple, tuple[Tensor, Tensor]] = {}  # (frame, keyframe, grid, device) → (grid, valid)

    @property
    def reuses_keyframe_pass(self) -> bool:
        return True  # a keyframe takes its own output unchanged

    # ---- once per edit ---------------------------------------------------------------------------
    @staticmethod
    def needed_pairs(schedule: list[list[int]], n_frames: int) -> list[Pair]:
        """The (frame, keyframe) pairs with a positive paper weight over the schedule, frame ≠ keyframe."""
        frames, pairs = torch.arange(n_frames), set()
        for keyframes in filter(None, schedule):
            kf = torch.tensor(sorted(keyframes), dtype=torch.long)
            positions, weights = paper_blend(frames, kf)
            for f, j in (weights > 0).nonzero().tolist():
                k = int(kf[positions[f, j]])
                if k != f:
                    pairs.add((f, k))
        return sorted(pairs)

    def cache_path(self, frames: np.ndarray, latent_hw: tuple[int, int]) -> Path:
        """Where the flows of these frames are kept: ``<cache_dir>/flow/<content and settings hash>.safetensors``."""
        key = json_digest({"format": FLOW_CACHE_FORMAT, "estimator": self.estimator.settings(), "alpha": self.config.alpha,
                           "beta": self.config.beta, "latent_hw": list(latent_hw), "frames": frames_fingerprint(frames)}, 32)
        root = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()
        return root / "flow" / f"{key}.safetensors"

    def prepare(self, inputs: PropagationInputs) -> None:
        """Flow for every (frame, keyframe) pair of ``inputs.keyframes`` (from disk when cached)."""
        self.pairs, self._fields = {}, {}
        n_frames = len(inputs.frames) if inputs.frames is not None else inputs.inversion.n_frames
        needed = self.needed_pairs(inputs.keyframes, n_frames)
        if not needed:
            return
        frames = self._frames(inputs)
        path = self.cache_path(frames, inputs.latent_hw) if self.config.cache else None
        if path is not None:
            self.pairs = _load(path, inputs.latent_hw)
        missing = [p for p in needed if p not in self.pairs]
        log.info("flow: %d (frame, keyframe) pairs, %d cached, %d to compute", len(needed), len(needed) - len(missing),
                 len(missing))
        if not missing:
            return
        self.pairs.update(self._compute(frames, missing, inputs.latent_hw))
        if path is not None:
            _save(path, self.pairs)

    def _frames(self, inputs: PropagationInputs) -> np.ndarray:
        frames = inputs.frames
        if frames is None:
            log.info("flow: no input frames given; decoding the inverted clean latents with the VAE")
            from tokenflow.storage.video import frames_from_tensor

            frames = frames_from_tensor(inputs.model.decode_latents(inputs.inversion.clean))
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise VideoError(f"flow needs (N, H, W, 3) uint8 frames, got shape {frames.shape} dtype {frames.dtype} — "
                             "pass Video.frames")
        n = None if inputs.inversion is None else inputs.inversion.n_frames
        if n is not None and n != len(frames):
            raise VideoError(f"{len(frames)} input frames for an inversion of {n} frames — pass the inverted video")
        return frames

    def _compute(self, frames: np.ndarray, pairs: list[Pair], latent_hw: tuple[int, int]) -> dict[Pair, PairFlow]:
        """Both flows of each pair once (serving (f, k) and (k, f) alike), reduced to the latent grid at once, so
        only two frame-resolution flows are held at a time."""
        todo, out = set(pairs), {}
        for f, k in pairs:
            if (f, k) not in todo:
                continue
            forward, backward = self.estimator(frames[f], frames[k]), self.estimator(frames[k], frames[f])
            for a, b, fwd, bwd in ((f, k, forward, backward), (k, f, backward, forward)):
                if (a, b) in todo:
                    todo.discard((a, b))
                    ok = consistent_pixels(fwd, bwd, self.config.alpha, self.config.beta)
                    fraction = F.adaptive_avg_pool2d(torch.from_numpy(ok).float()[None, None], latent_hw)[0, 0]
                    flow = resample_flow(torch.from_numpy(fwd).permute(2, 0, 1), latent_hw)
                    out[(a, b)] = PairFlow(flow.contiguous(), fraction.contiguous())
        return out

    # ---- per layer -------------------------------------------------------------------------------
    def token_field(self, frame: int, keyframe: int, grid: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        """``grid_sample`` grid (h, w, 2) into the keyframe, and consistent tokens (h, w) bool, for one pair."""
        key = (frame, keyframe, tuple(grid), str(device))
        if key not in self._fields:
            pair = self.pairs.get((frame, keyframe))
            if pair is None:
                raise RuntimeError(f"FlowPropagator has no flow for frame {frame} → keyframe {keyframe} — call "
                                   "prepare() with the schedule the edit uses")
            flow = resample_flow(pair.flow, grid)
            valid = F.adaptive_avg_pool2d(pair.consistent[None, None], tuple(grid))[0, 0] >= self.config.min_consistent
            self._fields[key] = (sampling_grid(flow).to(device), valid.to(device))
        return self._fields[key]

    def propagate(self, query: PropagationQuery) -> Tensor:
        frames, keyframes = query.frames.cpu(), query.keyframes.cpu()
        positions, weights = paper_blend(frames, keyframes)
        outputs = query.keyframe_outputs
        n_branches, _, n_tokens, _ = outputs.shape
        h, w = query.grid
        device = outputs.device
        samples = torch.zeros(2, n_branches, len(frames), n_tokens, outputs.shape[-1], dtype=outputs.dtype, device=device)
        valid = torch.zeros(len(frames), 2, n_tokens, dtype=torch.bool, device=device)
        for j in range(2):
            warp_rows, grids = [], []
            for i in range(len(frames)):
                if weights[i, j] <= 0:
                    continue
                f, k = int(frames[i]), int(keyframes[positions[i, j]])
                if f == k:  # a keyframe is its own output
                    samples[j, :, i], valid[i, j] = outputs[:, positions[i, j]], True
                    continue
                grid, ok = self.token_field(f, k, (h, w), device)
                warp_rows.append(i)
                grids.append(grid)
                valid[i, j] = ok.flatten()
            if warp_rows:
                samples[j, :, warp_rows] = self._warp(outputs[:, positions[warp_rows, j].to(device)], torch.stack(grids), (h, w))
        blend = _token_weights(weights.to(device, outputs.dtype), valid, self.config.fallback)  # (F, 2, S)
        return (blend[:, 0, :, None] * samples[0] + blend[:, 1, :, None] * samples[1])

    @staticmethod
    def _warp(keyframe_outputs: Tensor, grids: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """keyframe_outputs (B, R, S, D) sampled at grids (R, h, w, 2) → (B, R, S, D)."""
        b, r = keyframe_outputs.shape[:2]
        x = rearrange(keyframe_outputs.float(), "b r (h w) d -> (b r) d h w", h=grid_hw[0])  # float32 coordinates
        g = grids.float().expand(b, *grids.shape).reshape(b * r, *grids.shape[1:])
        out = F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=False)
        return rearrange(out, "(b r) d h w -> b r (h w) d", b=b).to(keyframe_outputs.dtype)


def _token_weights(weights: Tensor, valid: Tensor, fallback: Fallback) -> Tensor:
    """Per-token blend weights (F, 2, S) from paper weights (F, 2) and consistency (F, 2, S)."""
    w = weights[:, :, None].expand_as(valid)
    masked = w * valid
    total = masked.sum(1, keepdim=True)
    renormalised = masked / total.clamp_min(torch.finfo(w.dtype).tiny)
    if fallback == Fallback.nearest:
        nearest = (weights[:, 1] > weights[:, 0]).long()  # ties → the previous keyframe
        w = F.one_hot(nearest, 2).to(w.dtype)[:, :, None].expand_as(valid)
    return torch.where(total > 0, renormalised, w)


def _load(path: Path, latent_hw: tuple[int, int]) -> dict[Pair, PairFlow]:
    """Cached pairs, or {} when absent, damaged or of another latent size (then they are recomputed)."""
    if not path.is_file():
        return {}
    try:
        t = read_safetensors(path)
        pairs, flow, consistent = t["pairs"], t["flow"], t["consistent"]
        if flow.shape[-2:] != latent_hw or not (len(pairs) == len(flow) == len(consistent)):
            raise ValueError(f"shapes {tuple(flow.shape)} / {tuple(consistent.shape)} for {len(pairs)} pairs")
    except Exception as e:  # a damaged entry is recomputed, never trusted
        log.warning("flow cache %s unreadable (%s); recomputing", path, e)
        return {}
    return {(int(f), int(k)): PairFlow(flow[i], consistent[i]) for i, (f, k) in enumerate(pairs.tolist())}


def _save(path: Path, pairs: dict[Pair, PairFlow]) -> None:
    keys = sorted(pairs)
    tensors = {"pairs": torch.tensor(keys, dtype=torch.long).view(-1, 2),
               "flow": torch.stack([pairs[p].flow for p in keys]).contiguous(),
               "consistent": torch.stack([pairs[p].consistent for p in keys]).contiguous()}
    try:
        with atomic_file(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp))
    except OSError as e:  # a read-only or full cache dir costs a recomputation next time, not the edit
        log.warning("flow cache %s not written (%s)", path, e)
