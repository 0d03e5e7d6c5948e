"""Prompt-to-Prompt cross-attention control as diffusers attention processors.

:class:`P2PCrossAttention` replaces the processor of a cross-attention layer (``attn2``) for one run.
While control is active it computes ``softmax(QKᵀ·scale)`` explicitly for the whole batch of branches
(B·F, S, L), rewrites the probabilities of the target's conditional branch from the source branch's
(:class:`CrossAttentionEdit`), records word maps for :class:`LocalBlend`, and multiplies by V; otherwise
it calls the layer's original processor. :class:`RestoreProcessors` puts the original objects back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from tokenflow.core.editor import SOURCE, Step
from tokenflow.models.layout import check_attention_supported


@dataclass
class CrossAttentionEdit:
    """How the target's conditional cross-attention probabilities are rewritten, all (L,) over text positions.

    mapper: source position per target position (-1: new word). inject: weight of the source map
    (1 for word swap, 0 for new words in refinement, 0 everywhere for pure reweighting).
    equalizer: scale of the result per position. fraction: first fraction of the steps under control.
    """

    mapper: Tensor
    inject: Tensor
    equalizer: Tensor
    fraction: float

    def active(self, step: Step) -> bool:
        return step.within(self.fraction)

    def __call__(self, base: Tensor, target: Tensor) -> Tensor:
        """base, target (..., S, L): source / target probabilities → new target probabilities."""
        w = self.inject.to(target)
        mixed = base[..., self.mapper.clamp(min=0).to(base.device)] * w + target * (1 - w)
        return mixed * self.equalizer.to(target)


@dataclass
class LocalBlend:
    """Mask of where the chosen words are, from the source's and the target's cross-attention maps.

    Maps are recorded by the processors of ``layers`` (all at ``level`` downsamplings, e.g. 16x16 for a
    64x64 latent) during one UNet call and consumed by :meth:`mask` for that same call's ``Step``.
    """

    source_positions: list[int]
    target_positions: list[int]
    layers: frozenset[str]
    level: int
    threshold: float
    _step: Step | None = None
    _maps: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def record(self, layer: str, step: Step, source: Tensor, target: Tensor) -> None:
        """source, target (F, H, S, L) probabilities → keep the head-mean of the words' summed maps (F, S)."""
        if step is not self._step:
            self._step, self._maps = step, {}
        self._maps[layer] = (source[..., self.source_positions].sum(-1).mean(1).float(),
                             target[..., self.target_positions].sum(-1).mean(1).float())

    def mask(self, step: Step, size: tuple[int, int]) -> Tensor:
        """(F, 1, h, w) in {0, 1}: union of the source's and the target's thresholded word maps at latent ``size``."""
        if step is not self._step or not self._maps:
            raise RuntimeError("LocalBlend.mask: no cross-attention maps were recorded for this UNet call")
        h, w = size
        for _ in range(self.level):
            h, w = -(-h // 2), -(-w // 2)
        masks = []
        for which in (0, 1):
            m = torch.stack([maps[which] for maps in self._maps.values()]).mean(0)  # (F, S)
            m = F.max_pool2d(m.reshape(-1, 1, h, w), 3, stride=1, padding=1)
            m = F.interpolate(m, size=size)
            masks.append(m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) > self.threshold)
        self._step, self._maps = None, {}
        return (masks[0] | masks[1]).float()


class P2PCrossAttention:
    """Processor of one cross-attention layer under Prompt-to-Prompt control (see the module docstring)."""

    def __init__(self, name: str, original, edit: CrossAttentionEdit, blend: LocalBlend | None,
                 step_ref: Callable[[], Step | None], target: str) -> None:
        self.name, self.original, self.edit, self.step_ref, self.target = name, original, edit, step_ref, target
        self.blend = blend if blend is not None and name in blend.layers else None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        step = self.step_ref()
        src = tgt = None
        if step is not None:
            src, tgt = step.index_of(SOURCE), step.index_of(self.target)
        edit = src is not None and tgt is not None and self.edit.active(step)
        if src is None or tgt is None or not (edit or self.blend is not None):
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, temb=temb, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[1], hidden_states.shape[0])
        probs = rearrange(attn.get_attention_scores(q, k, attention_mask), "(b f h) s l -> b f h s l",
                          b=len(step.branches), h=attn.heads)
        if self.blend is not None:
            self.blend.record(self.name, step, probs[src], probs[tgt])
        if edit:
            probs[tgt] = self.edit(probs[src], probs[tgt]).to(probs.dtype)
        out = torch.bmm(rearrange(probs, "b f h s l -> (b f h) s l"), v)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))
        return out / attn.rescale_output_factor


class RestoreProcessors:
    """Handle whose ``remove()`` puts back the processor objects the named layers had when it was made."""

    def __init__(self, unet: torch.nn.Module, names: list[str] | tuple[str, ...]) -> None:
        self._unet = unet
        self._saved = {name: unet.get_submodule(name).processor for name in names}

    def remove(self) -> None:
        for name, processor in self._saved.items():
            self._unet.get_submodule(name).set_processor(processor)
        self._saved = {}


def install_cross_attention(unet: torch.nn.Module, names: tuple[str, ...], edit: CrossAttentionEdit,
                            blend: LocalBlend | None, step_ref: Callable[[], Step | None],
                            target: str) -> RestoreProcessors:
    """Put a :class:`P2PCrossAttention` on each named ``attn2`` layer; the handle restores the originals."""
    for name in names:
        check_attention_supported(unet.get_submodule(name), name, "Prompt-to-Prompt processor")
    handle = RestoreProcessors(unet, names)
    for name in names:
        attn = unet.get_submodule(name)
        attn.set_processor(P2PCrossAttention(name, attn.processor, edit, blend, step_ref, target))
    return handle
