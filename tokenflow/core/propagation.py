"""Propagators: how non-keyframes obtain their self-attention output from the keyframes'.

``TokenFlowPropagator`` is the method: each token of a frame takes the edited keyframe output at its
nearest neighbour among the keyframe's *source* tokens (same layer, same timestep), blended between
two keyframes. ``NoPropagation`` edits every frame on its own (the per-frame baseline).
"""
from __future__ import annotations

from abc import ABC
from typing import Callable

import torch
from torch import Tensor

from tokenflow.errors import ConfigError
from tokenflow.core.search import NeighbourSearch, TorchNeighbourSearch

# (layer, frames (R,), keyframe index, neighbour index (R, S), similarity (R, S)) -> None
CorrespondenceCallback = Callable[[str, Tensor, int, Tensor, Tensor], None]


def paper_blend(frames: Tensor, keyframes: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest previous and next keyframe, weights linear in temporal distance (the paper).

    frames (F,), keyframes (K,) sorted → (positions into ``keyframes`` (F, 2), weights (F, 2)).
    A keyframe takes itself with weight 1; frames before the first / after the last keyframe take it alone.
    """
    kf = keyframes.to(frames.device)
    nxt = torch.searchsorted(kf, frames, right=False).clamp(max=len(kf) - 1)
    prv = (torch.searchsorted(kf, frames, right=True) - 1).clamp(min=0)
    k_prev, k_next = kf[prv].float(), kf[nxt].float()
    span = (k_next - k_prev).clamp(min=1)
    w_prev = torch.where(k_next == k_prev, torch.ones_like(span), (k_next - frames.float()) / span)
    w_prev = torch.where(frames < kf[0], torch.zeros_like(w_prev), w_prev)
    w_prev = torch.where(frames > kf[-1], torch.ones_like(w_prev), w_prev)
    return torch.stack([prv, nxt], 1), torch.stack([w_prev, 1 - w_prev], 1)


def reference_blend(frames: Tensor, keyframes: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """The official code's blend: keyframes of the frame's chunk and of the previous chunk.

    Chunk i = frame // stride; distances to the chunk *centres* p1 = i·stride + stride//2 and
    p2 = p1 - stride; weight of chunk i's keyframe ``sigmoid(d2 / (d1 + d2))`` (chunk 0: 1).
    """
    chunk = torch.div(frames, stride, rounding_mode="floor")
    if int(chunk.max()) >= len(keyframes):
        raise ConfigError(f"the reference blend needs one keyframe per chunk of {stride} frames — got {len(keyframes)} "
                          f"keyframes for frames up to {int(frames.max())}")
    p1 = chunk * stride + stride // 2
    p2 = p1 - stride
    d1, d2 = (frames - p1).abs().float(), (frames - p2).abs().float()
    w1 = torch.sigmoid(d2 / (d1 + d2))
    w1 = torch.where(chunk == 0, torch.ones_like(w1), w1)
    prev = (chunk - 1).clamp(min=0)
    return torch.stack([chunk, prev], 1), torch.stack([w1, 1 - w1], 1)


class Propagator(ABC):
    """Decides whether keyframes are edited jointly and how their tokens reach the other frames."""

    uses_keyframes: bool = True

    def blend(self, frames: Tensor, keyframes: Tensor) -> tuple[Tensor, Tensor]:
        """(positions into keyframes (F, 2), weights (F, 2)) for the given global frame indices."""
        raise NotImplementedError

    def propagate(self, layer: str, frames: Tensor, keyframes: Tensor, source: Tensor, keyframe_source: Tensor,
                  keyframe_outputs: Tensor, on_match: CorrespondenceCallback | None = None) -> Tensor:
        """source (F, S, C), keyframe_source (K, S, C), keyframe_outputs (B, K, S, D) → (B, F, S, D)."""
        raise NotImplementedError


class TokenFlowPropagator(Propagator):
    """Nearest-neighbour token propagation (TokenFlow).

    blend: ``paper`` (previous/next keyframe, linear weights) or ``reference`` (official code).
    source_features: ``clean`` computes the source branch's own self-attention in every frame, so
    correspondences come from the unmodified source video; ``propagated`` propagates it like the
    edit branches, as the official code does.
    """

    def __init__(self, search: NeighbourSearch | None = None, blend: str = "paper", stride: int = 8,
                 source_features: str = "clean") -> None:
        if blend not in ("paper", "reference"):
            raise ConfigError(f"propagator.blend={blend!r} is unknown — use 'paper' or 'reference'")
        if source_features not in ("clean", "propagated"):
            raise ConfigError(f"propagator.source_features={source_features!r} is unknown — use 'clean' or 'propagated'")
        self.search = search or TorchNeighbourSearch()
        self.blend_mode, self.stride, self.source_features = blend, stride, source_features

    def blend(self, frames: Tensor, keyframes: Tensor) -> tuple[Tensor, Tensor]:
        if self.blend_mode == "paper":
            return paper_blend(frames, keyframes)
        return reference_blend(frames, keyframes, self.stride)

    def propagate(self, layer: str, frames: Tensor, keyframes: Tensor, source: Tensor, keyframe_source: Tensor,
                  keyframe_outputs: Tensor, on_match: CorrespondenceCallback | None = None) -> Tensor:
        positions, weights = self.blend(frames.cpu(), keyframes.cpu())
        positions, weights = positions.to(source.device), weights.to(source.device, keyframe_outputs.dtype)
        n_branches, _, n_tokens, width = keyframe_outputs.shape
        out = keyframe_outputs.new_zeros(n_branches, len(frames), n_tokens, width)
        for k in torch.unique(positions[weights > 0]).tolist():
            rows, cols = torch.nonzero((positions == k) & (weights > 0), as_tuple=True)
            rows_u = torch.unique(rows)
            queries = source[rows_u].reshape(1, -1, source.shape[-1])
            index, similarity = self.search.search(queries, keyframe_source[k : k + 1])
            index = index.reshape(len(rows_u), n_tokens)
            if on_match is not None:
                on_match(layer, frames[rows_u], int(keyframes[k]), index, similarity.reshape(len(rows_u), n_tokens))
            gathered = keyframe_outputs[:, k][:, index]  # (B, R, S, D)
            w = torch.zeros(len(frames), device=source.device, dtype=out.dtype)
            w.index_put_((rows,), weights[rows, cols], accumulate=True)
            out[:, rows_u] += w[rows_u].view(1, -1, 1, 1) * gathered
        return out


class NoPropagation(Propagator):
    """Every frame edited independently with its own self-attention (the per-frame baseline)."""

    uses_keyframes = False
