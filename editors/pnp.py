"""Plug-and-Play (Tumanyan et al., 2023) as a TokenFlow keyframe editor.

The source branch (inverted latents at t, inversion prompt) is run alongside the edit branches;
for the first ``pnp_f_t`` of the steps the decoder's residual features at ``conv_layers`` (conv2
output before the skip, decoder layer 4 in SD) of the edit branches are replaced by the source's,
and for the first ``pnp_attn_t`` the self-attention queries and keys at ``attn_layers`` (decoder
layers 4-11). Classifier-free guidance with the negative prompt (with a null-text inversion and an
empty negative prompt: the per-frame, per-step null-text embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokenflow.models.ddim import add_noise, noise_from_latent
from tokenflow.core.editor import SOURCE, EditInputs, Step
from tokenflow.errors import ConfigError

from tokenflow.core.guidance import GuidedEditor


@dataclass
class PnPConfig:
    guidance_scale: float = 7.5                  # classifier-free guidance weight
    pnp_f_t: float = 0.8                         # fraction of steps with residual-feature injection
    pnp_attn_t: float = 0.5                      # fraction of steps with self-attention Q/K injection
    conv_layers: list[int] = field(default_factory=lambda: [4])            # decoder layers (PnP numbering)
    attn_layers: list[int] = field(default_factory=lambda: list(range(4, 12)))
    # start latent: "inverted" = the inverted latent at the first timestep (exact DDIM trajectory);
    # "renoised" = the official code: z0 re-noised at the first timestep with the noise implied by
    # the noisiest kept inverted latent (x_999 when the inversion keeps its final latent)
    initial_latent: str = "inverted"

    def __post_init__(self) -> None:
        for name in ("pnp_f_t", "pnp_attn_t"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"editor.{name}={v} must be in [0, 1] — it is a fraction of the denoising steps")
        if self.guidance_scale < 0:
            raise ConfigError(f"editor.guidance_scale={self.guidance_scale} must be >= 0 — 7.5 is the usual value")
        if self.initial_latent not in ("inverted", "renoised"):
            raise ConfigError(f"editor.initial_latent={self.initial_latent!r} is unknown — use 'inverted' or 'renoised'")


class PnPEditor(GuidedEditor):
    """PnP feature and self-attention injection from the source branch, with CFG."""

    needs_source = True
    Config = PnPConfig

    def __init__(self, **config) -> None:
        self.config = PnPConfig(**config)
        self._attn_layers: frozenset[str] = frozenset()

    def initial_latents(self, inputs: EditInputs, timesteps: list[int]) -> Tensor:
        if self.config.initial_latent == "inverted":
            return super().initial_latents(inputs, timesteps)
        inv, scheduler = inputs.inversion, inputs.model.scheduler
        noisiest = max(inv.timesteps)
        eps = noise_from_latent(scheduler, inv.clean, inv.at(noisiest), noisiest)
        return add_noise(scheduler, inv.clean, eps, timesteps[0])

    def _active(self, fraction: float, step: Step) -> bool:
        return step.index < int(step.n_steps * fraction)

    def self_attention(self, layer: str, q: Tensor, k: Tensor, v: Tensor, step: Step):
        src = step.index_of(SOURCE)
        if layer not in self._attn_layers or src is None or not self._active(self.config.pnp_attn_t, step):
            return q, k, v
        edit = [i for i, b in enumerate(step.branches) if b.latents == "edit"]
        q, k = q.clone(), k.clone()
        q[edit], k[edit] = q[src].expand_as(q[edit]), k[src].expand_as(k[edit])
        return q, k, v

    def install(self, unet: torch.nn.Module, layout, step_ref) -> list:
        self._attn_layers = frozenset(layout.decoder_self_attention(self.config.attn_layers))

        def inject(module, args, output: Tensor):
            step = step_ref()
            if step is None or not self._active(self.config.pnp_f_t, step):
                return output
            src = step.index_of(SOURCE)
            if src is None:
                return output
            out = output.unflatten(0, (len(step.branches), -1)).clone()
            edit = [i for i, b in enumerate(step.branches) if b.latents == "edit"]
            out[edit] = out[src].expand_as(out[edit])
            return out.flatten(0, 1)

        return [unet.get_submodule(layout.decoder_resnet_output(i)).register_forward_hook(inject)
                for i in self.config.conv_layers]
