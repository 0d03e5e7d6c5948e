"""Attention key/value injection: a structure-preserving keyframe editor for any backbone (PnP's counterpart on a transformer).

The source branch (inverted latents, inversion prompt) runs alongside the edit branches. For the first
``inject_t`` of the steps, the image self-attention **values** (``inject=v``, as RF-Solver-Edit shares
them on FLUX) or **keys and values** (``inject=kv``, as Stable Flow / MasaCtrl-style mutual attention)
of the edit branches are replaced by the source branch's at the chosen layers, so the edit keeps the
source's layout while queries (and, on an MMDiT, the text tokens) follow the prompt. Classifier-free
guidance in the sampler's form (ε for DDIM, velocity for flow matching).

Layers are named by the backbone's hook sites (:meth:`injection_layers`): on an MMDiT, ``blocks``
are transformer-block indices (both the joint ``attn`` and SD 3.5's image-only ``attn2`` of each) and
default to the second half of the blocks; on an SD UNet they are PnP's decoder layers and default to
PnP's self-attention layers (decoder layers 4-11 on SD 1.x/2.x). The MMDiT default is this library's
choice, not a published recipe (none fixes the blocks for SD 3): sweep ``editor.blocks`` for your model.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from torch import Tensor

from tokenflow.core.editor import SOURCE, Step
from tokenflow.core.guidance import GuidedEditor
from tokenflow.models.layout import MMDiTLayout
from tokenflow.options import choice, configured, fraction, non_negative


class Inject(str, Enum):
    v = "v"     # values only (RF-Solver-Edit's feature sharing)
    kv = "kv"   # keys and values (mutual self-attention)


@dataclass
class KVInjectionConfig:
    guidance_scale: float = 7.5            # classifier-free guidance weight
    inject_t: float = 0.5                  # fraction of the steps with injection (the first ones)
    inject: Inject = Inject.kv             # v | kv
    blocks: Optional[list[int]] = None     # MMDiT block indices, or UNet decoder layers (PnP numbering);
                                           # None: the second half of the blocks / PnP's attention layers

    def __post_init__(self) -> None:
        self.inject_t = fraction(self.inject_t, "editor.inject_t", "a fraction of the steps")
        self.guidance_scale = non_negative(self.guidance_scale, "editor.guidance_scale")
        self.inject = choice(Inject, self.inject, "editor.inject")


def injection_layers(layout, blocks: list[int] | None) -> tuple[str, ...]:
    """The self-attention layers injected for ``blocks`` on this backbone's hook sites (see the module docstring)."""
    if isinstance(layout, MMDiTLayout):
        chosen = list(range(layout.n_blocks // 2, layout.n_blocks)) if blocks is None else list(blocks)
        return layout.blocks_self_attention(chosen)
    _, attn_default = layout.pnp_layers()
    return layout.decoder_self_attention(attn_default if blocks is None else list(blocks))


@configured
class KVInjectionEditor(GuidedEditor):
    """Source-branch key/value injection at named layers for the first steps, with CFG."""

    needs_source = True
    Config = KVInjectionConfig

    def __init__(self, **config) -> None:
        self.config = KVInjectionConfig(**config)
        self._layers: frozenset[str] = frozenset()

    def install(self, denoiser, layout, step_ref) -> list:
        self._layers = frozenset(injection_layers(layout, self.config.blocks))
        return []

    @property
    def layers(self) -> frozenset[str]:
        """The layers injected in this run (known once installed)."""
        return self._layers

    def self_attention(self, layer: str, q: Tensor, k: Tensor, v: Tensor, step: Step):
        src = step.index_of(SOURCE)
        if layer not in self._layers or src is None or not step.within(self.config.inject_t):
            return q, k, v
        edit = step.edit_branches
        v2 = v.clone()
        v2[edit] = v[src].expand_as(v2[edit])
        if self.config.inject is Inject.v:
            return q, k, v2
        k2 = k.clone()
        k2[edit] = k[src].expand_as(k2[edit])
        return q, k2, v2
