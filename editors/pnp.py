"""Plug-and-Play (Tumanyan et al., 2023) as a TokenFlow keyframe editor.

The source branch (inverted latents at t, inversion prompt) is run alongside the edit branches;
for the first ``pnp_f_t`` of the steps the decoder's residual features at ``conv_layers`` (conv2
output before the skip) of the edit branches are replaced by the source's, and for the first
``pnp_attn_t`` the self-attention queries and keys at ``attn_layers``. Unset layers are derived from
the UNet (:meth:`~tokenflow.models.layout.UNetLayout.pnp_layers`): decoder layer 4 and layers 4-11 for
SD 1.x/2.x, as published; the same place (the coarsest attention block) for SDXL. Classifier-free
guidance with the negative prompt or a null-text inversion's embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from enum import Enum
from typing import Optional

from tokenflow.core.editor import SOURCE, EditInputs, Step
from tokenflow.core.guidance import GuidedEditor
from tokenflow.options import choice, configured, fraction, non_negative


class InitialLatent(str, Enum):
    inverted = "inverted"   # the inverted latent at the first timestep (the exact DDIM trajectory)
    renoised = "renoised"   # the official code: z0 re-noised with the noise implied by the noisiest inverted latent


@dataclass
class PnPConfig:
    guidance_scale: float = 7.5                  # classifier-free guidance weight
    pnp_f_t: float = 0.8                         # fraction of steps with residual-feature injection
    pnp_attn_t: float = 0.5                      # fraction of steps with self-attention Q/K injection
    conv_layers: Optional[list[int]] = None     # decoder layers (PnP numbering); None: the UNet's PnP layers ([4] in SD)
    attn_layers: Optional[list[int]] = None     # None: the UNet's PnP attention layers (4-11 in SD)
    # start latent: "inverted" = the inverted latent at the first timestep (exact DDIM trajectory);
    # "renoised" = the official code: z0 re-noised at the first timestep with the noise implied by
    # the noisiest kept inverted latent (x_999 when the inversion keeps its final latent)
    initial_latent: InitialLatent = InitialLatent.inverted

    def __post_init__(self) -> None:
        self.pnp_f_t = fraction(self.pnp_f_t, "editor.pnp_f_t")
        self.pnp_attn_t = fraction(self.pnp_attn_t, "editor.pnp_attn_t")
        self.guidance_scale = non_negative(self.guidance_scale, "editor.guidance_scale")
        self.initial_latent = choice(InitialLatent, self.initial_latent, "editor.initial_latent")


@configured
class PnPEditor(GuidedEditor):
    """PnP feature and self-attention injection from the source branch, with CFG."""

    needs_source = True
    families = ("unet",)  # residual-feature injection at UNet decoder layers
    Config = PnPConfig

    def __init__(self, **config) -> None:
        self.config = PnPConfig(**config)
        self._attn_layers: frozenset[str] = frozenset()

    def initial_latents(self, inputs: EditInputs, timesteps: list[int]) -> Tensor:
        if self.config.initial_latent == "inverted":
            return super().initial_latents(inputs, timesteps)
        inv, sampler = inputs.inversion, inputs.sampler
        noisiest = max(inv.timesteps)
        eps = sampler.noise_from_latent(inv.clean, inv.at(noisiest), sampler.level(noisiest))
        return sampler.add_noise(inv.clean, eps, sampler.level(timesteps[0]))

    def self_attention(self, layer: str, q: Tensor, k: Tensor, v: Tensor, step: Step):
        src = step.index_of(SOURCE)
        if layer not in self._attn_layers or src is None or not step.within(self.config.pnp_attn_t):
            return q, k, v
        edit = step.edit_branches
        q2, k2 = q.clone(), k.clone()
        q2[edit], k2[edit] = q[src].expand_as(q2[edit]), k[src].expand_as(k2[edit])
        return q2, k2, v

    def install(self, unet: torch.nn.Module, layout, step_ref) -> list:
        conv_default, attn_default = layout.pnp_layers()
        conv_layers = conv_default if self.config.conv_layers is None else self.config.conv_layers
        attn_layers = attn_default if self.config.attn_layers is None else self.config.attn_layers
        self._attn_layers = frozenset(layout.decoder_self_attention(attn_layers))

        def inject(module, args, output: Tensor):
            step = step_ref()
            if step is None or not step.within(self.config.pnp_f_t):
                return output
            src = step.index_of(SOURCE)
            if src is None:
                return output
            branches = output.unflatten(0, (len(step.branches), -1))
            out, edit = branches.clone(), step.edit_branches
            out[edit] = branches[src].expand_as(out[edit])
            return out.flatten(0, 1)

        return [unet.get_submodule(layout.decoder_resnet_output(i)).register_forward_hook(inject)
                for i in conv_layers]
