"""Nearest-neighbour correspondence fields: what TokenFlow's propagation matches, as data.

:func:`compute_field` extracts the source-branch self-attention input tokens (the LayerNorm-ed block
input that the attention processor receives as ``hidden_states``) of every frame at one layer and
timestep -- by running the pipeline's own keyframe pass over the inverted latents with an editor that
adds no branch -- and matches them to each keyframe's tokens through
:meth:`TokenFlowPropagator.propagate`, i.e. the very search call that TokenFlow uses while editing.
The result is a :class:`CorrespondenceField`, which can be saved, loaded, turned into token
coordinates / flow and visualised (:mod:`tokenflow.evaluation.correspondence_plot`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from tokenflow.core.attention import TokenFlowRuntime
from tokenflow.atomic import atomic_file
from tokenflow.evaluation.correspondence_plot import (coordinate_colormap, identity_colormap, plot_field, similarity_heatmap,
                                  warp_keyframe)
from tokenflow.core.editor import SOURCE, Branch, EditInputs, KeyframeEditor, Step
from tokenflow.errors import ConfigError
from tokenflow.models.trajectory import InversionResult
from tokenflow.models.layout import UNetLayout, token_grid
from tokenflow.core.pipeline import TokenFlowPipeline
from tokenflow.core.propagation import PropagationQuery, TokenFlowPropagator
from tokenflow.core.search import NeighbourSearch

__all__ = ["CorrespondenceField", "compute_field", "source_tokens", "resolve_layer", "token_grid",
           "coordinate_colormap", "identity_colormap", "warp_keyframe", "similarity_heatmap", "plot_field"]

FIELD_FORMAT = 1
_META_KEY = "tokenflow_correspondence"


@dataclass
class CorrespondenceField:
    """Nearest keyframe token of every token of every frame, at one layer and timestep.

    index: (F, K, S) int64, ``index[f, k, s]`` = token of keyframe ``keyframes[k]`` nearest (cosine) to
    token ``s`` of frame ``frames[f]``; tokens are row-major on the ``grid`` = (h, w), S = h * w.
    similarity: (F, K, S) float32 cosine similarity of those matches.
    frames (F,), keyframes (K,): global frame indices (int64).
    """

    index: Tensor
    similarity: Tensor
    frames: Tensor
    keyframes: Tensor
    layer: str
    timestep: int
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        h, w = self.grid
        F, K = len(self.frames), len(self.keyframes)
        if tuple(self.index.shape) != (F, K, h * w) or self.similarity.shape != self.index.shape:
            raise ValueError(f"index {tuple(self.index.shape)} / similarity {tuple(self.similarity.shape)} must be "
                             f"(F={F}, K={K}, S={h * w}) for grid {self.grid}")

    def position(self, frame: int, keyframe: int) -> tuple[int, int]:
        """Positions (into ``frames``, into ``keyframes``) of global indices ``frame``, ``keyframe``."""
        fs, ks = self.frames.tolist(), self.keyframes.tolist()
        if frame not in fs or keyframe not in ks:
            raise ConfigError(f"frame {frame} / keyframe {keyframe} not in this field (frames {fs}, keyframes {ks})")
        return fs.index(frame), ks.index(keyframe)

    def identity(self) -> Tensor:
        """(h, w, 2) int64 (y, x) of every token of the grid."""
        h, w = self.grid
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([ys, xs], dim=-1)

    def coordinates(self) -> Tensor:
        """(F, K, h, w, 2) int64: (y, x) in keyframe k of the source of each token of frame f."""
        h, w = self.grid
        idx = self.index.reshape(*self.index.shape[:2], h, w)
        return torch.stack([torch.div(idx, w, rounding_mode="floor"), idx % w], dim=-1)

    def flow(self) -> Tensor:
        """(F, K, h, w, 2) int64 displacement in tokens (dy, dx) from keyframe to frame.

        ``flow[f, k, y, x] = (y, x) - coordinates[f, k, y, x]``: how far the content at (y, x) of frame f
        moved since keyframe k (content shifted right by one token gives dx = +1). No wrap-around.
        """
        return self.identity() - self.coordinates()

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (tensors + JSON metadata) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"index": self.index, "similarity": self.similarity, "frames": self.frames,
                   "keyframes": self.keyframes}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"format": FIELD_FORMAT, "layer": self.layer, "timestep": int(self.timestep), "grid": list(self.grid)}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CorrespondenceField":
        """Read a field written by :meth:`save`."""
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
        if raw is None:
            raise ConfigError(f"{path} is not a correspondence field (no '{_META_KEY}' metadata)")
        meta = json.loads(raw)
        if meta.get("format") != FIELD_FORMAT:
            raise ConfigError(f"{path} has field format {meta.get('format')}, this library reads {FIELD_FORMAT}")
        t = load_file(str(path))
        return cls(t["index"], t["similarity"], t["frames"], t["keyframes"], meta["layer"], int(meta["timestep"]),
                   (int(meta["grid"][0]), int(meta["grid"][1])))


class _SourceOnly(KeyframeEditor):
    """An editor with no edit branch: the UNet batch is the pipeline's source branch alone."""

    needs_source = True

    def prepare(self, inputs: EditInputs) -> None:
        pass

    def branches(self, step: Step) -> list[Branch]:
        return []

    def guide(self, eps: dict[str, Tensor], step: Step) -> Tensor:
        return eps[SOURCE]


def resolve_layer(layout: UNetLayout, layer: str | int) -> str:
    """A self-attention layer name from its name or its index into ``layout.self_attention``."""
    names = layout.self_attention
    if isinstance(layer, int) and not isinstance(layer, bool):
        if not -len(names) <= layer < len(names):
            raise ConfigError(f"self-attention layer {layer} does not exist — this UNet has layers 0-{len(names) - 1}")
        return names[layer]
    if layer not in names:
        raise ConfigError(f"{layer!r} is not a self-attention layer — use an index 0-{len(names) - 1} or one of "
                          f"{names[0]!r}, ...")
    return str(layer)


def _frame_indices(frames: list[int] | Tensor | None, n: int) -> Tensor:
    """(F,) int64 global frame indices (default: all ``n``); out-of-range indices are a ConfigError."""
    idx = torch.arange(n) if frames is None else torch.as_tensor(frames, dtype=torch.long).reshape(-1).cpu()
    bad = [i for i in idx.tolist() if not 0 <= i < n]
    if bad:
        raise ConfigError(f"frame indices {bad} are outside the video's {n} frames — use 0..{n - 1}")
    return idx


def source_tokens(model, inversion: InversionResult, layer: str | int, timestep: int,
                  frames: list[int] | Tensor | None = None, inversion_prompt: str | None = None,
                  chunk_size: int = 8) -> Tensor:
    """Source-branch self-attention input tokens (F, S, C) of ``frames`` at ``layer`` and ``timestep``.

    What the layer's processor receives as ``hidden_states`` for the source branch: the pipeline's
    keyframe pass (``TokenFlowPipeline.step_frames``) is run over ``inversion.at(timestep)`` with an
    editor that adds no branch, ``chunk_size`` frames per UNet call, and the tokens the processor keeps
    for the keyframes are read back. On the model's device, in its dtype.
    """
    pipe = TokenFlowPipeline(model, _SourceOnly(), TokenFlowPropagator(), n_steps=1, chunk_size=chunk_size)
    name = resolve_layer(pipe.layout, layer)
    prompt = inversion.prompt if inversion_prompt is None else inversion_prompt
    source = pipe.source_branch(prompt)  # the branch TokenFlow's edit runs: inversion prompt, inverted latents
    x = inversion.at(timestep)
    parts = []
    runtime = TokenFlowRuntime(pipe.editor, pipe.propagator, latent_hw=tuple(x.shape[-2:])).install(model.denoiser, pipe.layout)
    try:
        with torch.no_grad():
            for chunk in _frame_indices(frames, inversion.n_frames).split(chunk_size):
                pipe.step_frames(runtime, x, inversion, 0, [int(timestep)], chunk, chunk, "keyframes", source)
                parts.append(runtime.keyframe_tokens[name].source)
                runtime.keyframe_tokens.clear()  # keep one layer's tokens, not every layer's
    finally:
        runtime.remove()
    return torch.cat(parts)


def compute_field(model, inversion: InversionResult, layer: str | int, timestep: int, keyframes: list[int],
                  search: NeighbourSearch | None = None, frames: list[int] | Tensor | None = None,
                  inversion_prompt: str | None = None, chunk_size: int = 8) -> CorrespondenceField:
    """The nearest-neighbour field TokenFlow would use at ``layer`` and ``timestep`` for these keyframes.

    ``layer``: a self-attention layer name or an index into ``UNetLayout.self_attention``. Tokens come
    from :func:`source_tokens` (the UNet on ``inversion.at(timestep)`` with ``inversion_prompt``, default
    the inversion's prompt); every frame is matched to every keyframe by
    ``TokenFlowPropagator(search).propagate``, one keyframe at a time -- the search call TokenFlow edits
    with, whose similarity blocks are bounded by the backend's ``max_block_elements``. Results on the CPU.
    """
    if not keyframes:
        raise ConfigError("compute_field needs at least one keyframe — e.g. keyframes=[0]")
    frames_t = _frame_indices(frames, inversion.n_frames)
    kf = _frame_indices(sorted({int(k) for k in keyframes}), inversion.n_frames)
    name = resolve_layer(model.layout(), layer)
    wanted = torch.unique(torch.cat([frames_t, kf]))  # run every frame once, keyframes included
    tokens = source_tokens(model, inversion, name, timestep, wanted, inversion_prompt, chunk_size)
    query = tokens[torch.searchsorted(wanted, frames_t).to(tokens.device)]
    keys = tokens[torch.searchsorted(wanted, kf).to(tokens.device)]
    propagator = TokenFlowPropagator(search=search)
    S = tokens.shape[1]
    index = torch.empty(len(frames_t), len(kf), S, dtype=torch.int64)
    similarity = torch.empty(len(frames_t), len(kf), S, dtype=torch.float32)

    def record(_: str, rows: Tensor, keyframe: int, idx: Tensor, sim: Tensor) -> None:
        if not torch.equal(rows.cpu(), frames_t):
            raise RuntimeError("the propagator matched an unexpected set of frames")  # one keyframe: all frames
        k = kf.tolist().index(keyframe)
        index[:, k], similarity[:, k] = idx.cpu(), sim.float().cpu()

    dummy = tokens.new_zeros(1, 1, S, 1)  # keyframe outputs are not needed: width-1 placeholder
    grid = token_grid(tuple(inversion.clean.shape[-2:]), S)
    for k in range(len(kf)):
        propagator.propagate(PropagationQuery(name, grid, int(timestep), frames_t, kf[k:k + 1], dummy, query,
                                              keys[k:k + 1], record))
    return CorrespondenceField(index, similarity, frames_t.clone(), kf, name, int(timestep), grid)
