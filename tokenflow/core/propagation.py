"""Propagators: how non-keyframes obtain their self-attention output from the keyframes'.

The :class:`Propagator` interface says what a propagator needs (the source branch in the UNet batch,
clean or propagated source features, a hook to compute things once per video) and receives, per
layer and UNet call, a :class:`PropagationQuery` (the layer's token grid, the frames, the keyframes'
edited outputs and, when asked for, source tokens). The pipeline and the attention processors rely on
nothing else. ``TokenFlowPropagator`` is the method: each token of a frame takes the edited keyframe
output at its nearest neighbour among the keyframe's *source* tokens (same layer, same timestep),
blended between two keyframes. ``NoPropagation`` edits every frame on its own (the per-frame baseline).
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from tokenflow.core.correspondence_cache import CorrespondenceRecord, record_key
from tokenflow.core.search import NeighbourSearch, TorchNeighbourSearch
from tokenflow.errors import ConfigError
from tokenflow.models.layout import MMDiTLayout
from tokenflow.options import choice, configured
from tokenflow.paths import default_cache_dir

log = logging.getLogger(__name__)

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


@dataclass
class PropagationInputs:
    """What :meth:`Propagator.prepare` receives once per edit."""

    model: Any                       # tokenflow.models.DiffusionModel
    inversion: Any                   # tokenflow.models.InversionResult
    timesteps: list[int]             # the timesteps the edit runs through
    keyframes: list[list[int]]       # keyframes at each of those steps
    latent_hw: tuple[int, int]       # (h, w) of the latents
    frames: np.ndarray | None = None  # (N, H, W, 3) uint8 input frames when the caller has them, else None
    source_identity: str = ""        # hash of what the source branch's tokens depend on (model, inversion, prompt)
    partial: bool = False            # this process steps only its share of the frames (several processes)
    layout: Any = None               # the UNet's UNetLayout (self-attention layers and their stages)
    features: Tensor | None = None   # (N, h, w, C) the video features an adaptive keyframe schedule was cut on
    clips: list[int] | None = None   # first frame of each clip of that schedule (one keyframe per clip per step)


@dataclass
class PropagationQuery:
    """One layer of one UNet call in the ``propagate`` phase: what the propagator may read.

    keyframe_outputs (B, K, S, D): the keyframes' self-attention outputs of the branches to propagate.
    source (F, S, C) / keyframe_source (K, S, C): the source branch's input tokens of the frames and of
    the keyframes (None unless the propagator ``needs_source``). grid (h, w): the token grid (S = h·w,
    row-major). frames (F,) and keyframes (K,): global indices, on the CPU.
    """

    layer: str
    grid: tuple[int, int]
    timestep: int
    frames: Tensor
    keyframes: Tensor
    keyframe_outputs: Tensor
    source: Tensor | None = None
    keyframe_source: Tensor | None = None
    on_match: CorrespondenceCallback | None = None


class SourceFeatures(str, Enum):
    """How the source branch's own attention is obtained in propagated frames (``Propagator.source_features``)."""

    clean = "clean"           # the source branch computes its own self-attention in every frame
    propagated = "propagated" # the source branch is propagated like the edit branches (official code)


class Propagator(ABC):
    """Decides whether keyframes are edited jointly and how their tokens reach the other frames."""

    @property
    @abstractmethod
    def uses_keyframes(self) -> bool:
        """Keyframes are edited jointly first and the other frames take their tokens (else: per-frame editing)."""

    @property
    @abstractmethod
    def needs_source(self) -> bool:
        """The UNet batch must carry the source branch, whose tokens the query then holds."""

    @property
    @abstractmethod
    def source_features(self) -> SourceFeatures:
        """How the source branch's own attention is obtained in propagated frames: computed per frame
        (``clean``) or propagated like the edit branches (``propagated``, the official code)."""

    @property
    def reuses_keyframe_pass(self) -> bool:
        """A keyframe propagated to itself equals its keyframe-pass result, so the pipeline does not
        recompute keyframes in the chunk pass (3N instead of 3(N+K) UNet evaluations per step for PnP)."""
        return False

    def prepare(self, inputs: PropagationInputs) -> None:
        """Compute what depends only on the video, once per edit (e.g. optical flow); default nothing."""

    def finish(self) -> None:
        """Called once the edit's last step is done (e.g. to write what was recorded); default nothing."""

    def propagates(self, layer: str) -> bool:
        """Whether ``layer``'s attention is propagated; a layer that is not computes its own, per frame (ablations).
        Default: every self-attention layer."""
        return True

    @abstractmethod
    def propagate(self, query: PropagationQuery) -> Tensor:
        """The self-attention outputs (B, F, S, D) of the query's frames, from the keyframes'."""


class Blend(str, Enum):
    paper = "paper"           # previous and next keyframe, weights linear in temporal distance
    reference = "reference"   # the official code: this and the previous chunk's keyframe, sigmoid weights


class Stage(str, Enum):
    down = "down"
    mid = "mid"
    up = "up"


@dataclass
class TokenFlowPropagatorConfig:
    blend: Blend = Blend.paper
    stride: int = 8                                   # chunk length the reference blend assumes
    source_features: SourceFeatures = SourceFeatures.clean
    reuse_correspondences: bool = False               # record the fields of the first edit of a video, read them in
                                                      # the next ones (prompt sweeps): no search, no source branch
                                                      # unless the editor needs one
    cache_dir: Optional[str] = None                   # where records go: <cache_dir>/correspondences (None: the
                                                      # library's cache dir)
    stages: Optional[list[Stage]] = None              # UNet stages whose self-attention is propagated (None: all,
                                                      # the method); the others attend per frame (an ablation)
    blocks: Optional[list[int]] = None                # MMDiT (SD 3) blocks whose image self-attention is propagated
                                                      # (None: every block, as the paper on the UNet); the others
                                                      # attend per frame

    def __post_init__(self) -> None:
        self.blend = choice(Blend, self.blend, "propagator.blend")
        self.source_features = choice(SourceFeatures, self.source_features, "propagator.source_features")
        if self.stride < 1:
            raise ConfigError(f"propagator.stride={self.stride} must be >= 1 — use the keyframe stride, e.g. 8")
        if self.stages is not None:
            self.stages = [choice(Stage, s, "propagator.stages[]") for s in self.stages]
            if not self.stages:
                raise ConfigError("propagator.stages=[] propagates nothing — use propagator=none for per-frame editing")
        if self.blocks is not None and not self.blocks:
            raise ConfigError("propagator.blocks=[] propagates nothing — use propagator=none for per-frame editing")


@configured
class TokenFlowPropagator(Propagator):
    """Nearest-neighbour token propagation (TokenFlow).

    blend: ``paper`` (previous/next keyframe, linear weights) or ``reference`` (official code).
    source_features: ``clean`` computes the source branch's own self-attention in every frame, so
    correspondences come from the unmodified source video; ``propagated`` propagates it like the
    edit branches, as the official code does. search: the nearest-neighbour backend.
    """

    Config = TokenFlowPropagatorConfig

    def __init__(self, search: NeighbourSearch | None = None, **config: Any) -> None:
        self.config = TokenFlowPropagatorConfig(**config)
        self.search = search or TorchNeighbourSearch()
        self._record: CorrespondenceRecord | None = None
        self._recording = False
        self._layers: frozenset[str] | None = None  # propagated layers (None: all)

    uses_keyframes = True  # type: ignore[assignment]

    @property
    def needs_source(self) -> bool:  # type: ignore[override]
        """Source tokens are needed unless this edit reads a complete correspondence record."""
        return not self.replaying

    @property
    def replaying(self) -> bool:
        return self._record is not None and self._record.complete

    def propagates(self, layer: str) -> bool:
        return self._layers is None or layer in self._layers

    def prepare(self, inputs: PropagationInputs) -> None:
        self._layers = None
        for knob in ("stages", "blocks"):
            if getattr(self.config, knob) is not None and inputs.layout is None:
                raise ConfigError(f"propagator.{knob} needs the model's layout in PropagationInputs — run through "
                                  "TokenFlowPipeline")
        is_mmdit = isinstance(inputs.layout, MMDiTLayout)
        if self.config.stages is not None:
            if is_mmdit:
                raise ConfigError("propagator.stages names UNet stages (down/mid/up); this model is an MMDiT — choose "
                                  "transformer blocks with propagator.blocks=[...]")
            wanted = {s.value for s in self.config.stages}
            self._layers = frozenset(n for n in inputs.layout.self_attention if inputs.layout.stage[n] in wanted)
        if self.config.blocks is not None:
            if not is_mmdit:
                raise ConfigError("propagator.blocks names MMDiT (SD 3) transformer blocks; this model is a UNet — "
                                  "choose stages with propagator.stages=[down,mid,up]")
            self._layers = frozenset(inputs.layout.blocks_self_attention(list(self.config.blocks)))
        self._record, self._recording = None, False
        if not self.config.reuse_correspondences:
            return
        key = record_key(source=inputs.source_identity, keyframes=inputs.keyframes, timesteps=inputs.timesteps,
                         blend=self.config.blend.value, stride=self.config.stride,
                         source_features=self.config.source_features.value, search=self.search.name,
                         exact=self.search.exact)
        root = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()
        self._record = CorrespondenceRecord(root / "correspondences" / key)
        self._recording = not self._record.complete and not inputs.partial
        log.info("correspondences: %s %s", "reading" if self.replaying else "recording" if self._recording else
                 "computing (a share of the frames: not recorded)", self._record.folder)

    def finish(self) -> None:
        if self._recording and self._record is not None:
            self._record.finish({"format": 1})
        self._recording = False

    @property
    def source_features(self) -> SourceFeatures:
        return self.config.source_features

    @property
    def reuses_keyframe_pass(self) -> bool:
        # paper blend: a keyframe takes itself with weight 1 and each of its tokens is its own nearest neighbour
        return self.config.blend == Blend.paper

    def blend(self, frames: Tensor, keyframes: Tensor) -> tuple[Tensor, Tensor]:
        """(positions into keyframes (F, 2), weights (F, 2)) for the given global frame indices (CPU)."""
        if self.config.blend == Blend.paper:
            return paper_blend(frames, keyframes)
        return reference_blend(frames, keyframes, self.config.stride)

    def propagate(self, query: PropagationQuery) -> Tensor:
        if not self.replaying and (query.source is None or query.keyframe_source is None):
            raise ValueError("TokenFlowPropagator needs source tokens in the query (needs_source=True)")
        frames, keyframes = query.frames.cpu(), query.keyframes.cpu()
        positions, weights = self.blend(frames, keyframes)  # CPU: every decision below is made without a device sync
        outputs = query.keyframe_outputs
        n_branches, _, n_tokens, width = outputs.shape
        device = outputs.device
        out = outputs.new_zeros(n_branches, len(frames), n_tokens, width)
        merged = positions[:, 0] == positions[:, 1]  # one keyframe for both candidates: search it once
        weights = torch.stack([torch.where(merged, weights.sum(1), weights[:, 0]),
                               torch.where(merged, torch.zeros_like(weights[:, 1]), weights[:, 1])], 1)
        for j in range(2):
            rows = torch.nonzero(weights[:, j] > 0).squeeze(1)
            if len(rows) == 0:
                continue
            kf_pos = positions[rows, j]
            rows_d, kf_d = rows.to(device, non_blocking=True), kf_pos.to(device, non_blocking=True)
            if self.replaying:  # the fields of an earlier edit of this video and schedule
                index = self._record.lookup(query.timestep, query.layer, frames[rows], keyframes[kf_pos]).to(device)
                similarity = torch.full(index.shape, float("nan"), device=device)
            else:
                index, similarity = self.search.search(query.source[rows_d], query.keyframe_source[kf_d])  # (R, S)
                if self._recording:
                    self._record.record(query.timestep, query.layer, frames[rows], keyframes[kf_pos], index)
            if query.on_match is not None:
                for k in torch.unique(kf_pos).tolist():  # inspection only: grouped by keyframe on the host
                    sel = (kf_pos == k).nonzero().squeeze(1)
                    sel_d = sel.to(device)
                    query.on_match(query.layer, frames[rows[sel]], int(keyframes[k]), index[sel_d], similarity[sel_d])
            gathered = torch.gather(outputs[:, kf_d], 2, index[None, :, :, None].expand(n_branches, -1, -1, width))
            w = weights[rows, j].to(device, outputs.dtype, non_blocking=True)
            out[:, rows_d] += w.view(1, -1, 1, 1) * gathered
        return out


class NoPropagation(Propagator):
    """Every frame edited independently with its own self-attention (the per-frame baseline)."""

    uses_keyframes = False  # type: ignore[assignment]
    needs_source = False  # type: ignore[assignment]
    source_features = SourceFeatures.clean  # type: ignore[assignment]

    def propagate(self, query: PropagationQuery) -> Tensor:
        raise RuntimeError("NoPropagation never propagates: the pipeline edits every frame on its own")
