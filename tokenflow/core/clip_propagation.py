"""AdaFlow's propagation (Zhang et al., ICML 2025): each frame takes its clip's keyframe, along fields of the video.

With adaptive keyframes (:class:`~tokenflow.core.keyframes.AdaptiveKeyframes`) the video is cut into clips and
each step draws one keyframe per clip. AdaFlow propagates differently from TokenFlow's blend of two keyframes
along correspondences of the source branch's tokens at each layer and step:

* every token of a frame takes the self-attention output of **its own clip's keyframe** alone (no blend), at
* its nearest neighbour (cosine) among that keyframe's tokens in the **video features the clips were cut on**
  (DIFT in AdaFlow: clean frames, computed once), resized to the layer's token grid (bilinear,
  ``align_corners=False``) — the same field for every layer of a resolution and every step with that keyframe;
* every branch is propagated, the source branch included (``source_features=propagated``, as AdaFlow and the
  official TokenFlow code), so no source tokens are read.

AdaFlow precomputes every frame's field to every frame of its clip once (``matching``); here a field is
computed when a step first needs it (one search per resolution and UNet call, the same argmax) and kept for
that step only, so memory does not grow with the clip length squared.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenflow.core.clips import features_at
from tokenflow.core.propagation import PropagationInputs, PropagationQuery, Propagator, SourceFeatures
from tokenflow.core.search import NeighbourSearch, TorchNeighbourSearch
from tokenflow.errors import ConfigError
from tokenflow.options import choice


@dataclass
class ClipPropagatorConfig:
    source_features: SourceFeatures = SourceFeatures.propagated  # AdaFlow propagates the source branch too

    def __post_init__(self) -> None:
        self.source_features = choice(SourceFeatures, self.source_features, "propagator.source_features")


class ClipPropagator(Propagator):
    """AdaFlow's propagation (see the module docstring); needs ``keyframes=adaptive`` (its clips and features).

    source_features: ``propagated`` (AdaFlow) or ``clean`` (the source branch computes its own attention).
    search: the nearest-neighbour backend for the fields.
    """

    Config = ClipPropagatorConfig
    uses_keyframes = True  # type: ignore[assignment]
    needs_source = False  # type: ignore[assignment]
    reuses_keyframe_pass = True  # type: ignore[assignment]  a keyframe's own tokens are their nearest neighbours

    def __init__(self, search: NeighbourSearch | None = None, source_features: str = "propagated") -> None:
        self.config = ClipPropagatorConfig(source_features)  # type: ignore[arg-type]
        self.search = search or TorchNeighbourSearch()
        self._features: Tensor | None = None
        self._starts: Tensor | None = None
        self._fields: dict = {}
        self._timestep: int | None = None

    @property
    def source_features(self) -> SourceFeatures:
        return self.config.source_features

    def prepare(self, inputs: PropagationInputs) -> None:
        if inputs.features is None or inputs.clips is None:
            raise ConfigError("propagator=adaflow propagates within the clips of adaptive keyframes, along the features "
                              "they were cut on — use keyframes=adaptive (or experiment=reference_adaflow)")
        n = int(inputs.features.shape[0])
        if inputs.clips[0] != 0 or sorted(set(inputs.clips)) != list(inputs.clips) or inputs.clips[-1] >= n:
            raise ValueError(f"clip starts {inputs.clips[:8]} must be increasing from 0 and below {n}")
        for step, keyframes in enumerate(inputs.keyframes):
            clip = torch.searchsorted(torch.tensor(inputs.clips), torch.tensor(keyframes), right=True) - 1
            if clip.tolist() != list(range(len(inputs.clips))):
                raise ConfigError(f"propagator=adaflow needs exactly one keyframe per clip; step {step} has keyframes "
                                  f"{keyframes[:8]} for clips starting at {inputs.clips[:8]}")
        self._features, self._starts = inputs.features, torch.tensor(inputs.clips, dtype=torch.long)
        self._fields, self._timestep = {}, None

    def finish(self) -> None:
        self._features, self._fields = None, {}

    def clip_of(self, frames: Tensor) -> Tensor:
        """Index of the clip of each of ``frames`` (F,)."""
        if self._starts is None:
            raise RuntimeError("ClipPropagator.prepare() was not called")
        return torch.searchsorted(self._starts, frames, right=True) - 1

    def fields(self, grid: tuple[int, int], frames: Tensor, keyframes: Tensor, device) -> tuple[Tensor, Tensor]:
        """(index (F, S), similarity (F, S)): for each token of ``frames`` its nearest neighbour among the tokens of
        the matching ``keyframes`` (F,), in the video features at ``grid``."""
        key = (tuple(grid), tuple(frames.tolist()), tuple(keyframes.tolist()))
        if key not in self._fields:
            assert self._features is not None
            queries = features_at(self._features, frames, grid, device)
            targets = features_at(self._features, keyframes, grid, device)
            self._fields[key] = self.search.search(queries, targets)
        return self._fields[key]

    def propagate(self, query: PropagationQuery) -> Tensor:
        if self._timestep != query.timestep:  # fields are kept for one step (its keyframes) only
            self._fields, self._timestep = {}, query.timestep
        frames, keyframes = query.frames.cpu(), query.keyframes.cpu()
        position = self.clip_of(frames)  # one keyframe per clip, sorted: clip c's keyframe is keyframes[c]
        if int(position.max()) >= len(keyframes):
            raise RuntimeError(f"{len(keyframes)} keyframes for frames of clip {int(position.max())}")
        outputs = query.keyframe_outputs
        n_branches, _, _, width = outputs.shape
        index, similarity = self.fields(query.grid, frames, keyframes[position], outputs.device)
        if query.on_match is not None:
            for k in torch.unique(position).tolist():
                sel = (position == k).nonzero().squeeze(1)
                sel_d = sel.to(outputs.device)
                query.on_match(query.layer, frames[sel], int(keyframes[k]), index[sel_d], similarity[sel_d])
        source = outputs[:, position.to(outputs.device)]  # (B, F, S, D)
        return torch.gather(source, 2, index[None, :, :, None].expand(n_branches, -1, -1, width))
