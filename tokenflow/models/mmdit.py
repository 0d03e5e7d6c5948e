"""Stable Diffusion 3 / 3.5 as a backbone: three text encoders, an MMDiT transformer predicting velocity, a 16-channel VAE.

:class:`SD3Model` is the one place that knows how the components of a diffusers
``StableDiffusion3Pipeline`` folder are called, exactly as that pipeline calls them: prompts →
:class:`~tokenflow.models.backbone.TextEmbedding` (both CLIPs' penultimate hidden states concatenated and
zero-padded to the T5 width, then the T5 tokens after them, or zeros in the T5 slot when the checkpoint is
loaded without it; the two CLIPs' pooled projections concatenated), latents → the transformer's raw output
(a velocity, float32), images ↔ latents with the VAE's ``shift_factor`` and ``scaling_factor``.
Stepping is the sampler's (:mod:`tokenflow.samplers`), never the model's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.models.backbone import TextEmbedding, VAECoding, _Fingerprint, as_text_embedding
from tokenflow.models.fingerprint import weights_fingerprint, weights_signature
from tokenflow.models.layout import MMDiTLayout

log = logging.getLogger(__name__)


def token_ids(tokenizer, prompts: list[str], limit: int, device: torch.device) -> Tensor:
    """Token ids (n, limit) padded to ``limit`` and truncated there, as the SD 3 / FLUX pipelines tokenize; a prompt
    that is cut is named in a warning with what was dropped."""
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) > limit:
            dropped = tokenizer.decode(ids[limit - 1 : -1])
            log.warning("prompt %r is longer than %s's %d tokens; dropped: %r", prompt, type(tokenizer).__name__,
                        limit, dropped)
    tokens = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
    return tokens.input_ids.to(device)


@dataclass
class SD3Model(VAECoding):
    """The components of an SD 3 / 3.5 checkpoint on one device and dtype (``text_encoder_3`` may be None).

    ``identity`` names where the weights came from; ``fingerprint`` identifies what the model computes
    (every weight and config, the dtype, active adapters), as for the SD UNet family.
    ``max_sequence_length``: T5 tokens per prompt (the pipeline's default, 256).
    """

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    text_encoder_2: torch.nn.Module
    tokenizer_2: Any
    transformer: torch.nn.Module
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    identity: str
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: Any = None
    max_sequence_length: int = 256
    vae_batch: int = 8
    fingerprint: str = _Fingerprint()  # type: ignore[assignment]

    family = "mmdit"
    is_sdxl = False

    def __post_init__(self) -> None:
        if self.scheduler.__class__.__name__ != "FlowMatchEulerDiscreteScheduler":
            raise ModelLoadError(f"'{self.identity}': an SD 3 transformer samples with FlowMatchEulerDiscreteScheduler, "
                                 f"not {type(self.scheduler).__name__} — load the checkpoint's own scheduler")
        if (self.text_encoder_3 is None) != (self.tokenizer_3 is None):
            raise ModelLoadError(f"'{self.identity}': text_encoder_3 and tokenizer_3 come together — load both or "
                                 "neither (text_encoder_3=None, tokenizer_3=None: zeros in the T5 slot)")
        cfg = self.transformer.config
        clip = int(self.text_encoder.config.hidden_size) + int(self.text_encoder_2.config.hidden_size)
        if clip > int(cfg.joint_attention_dim):
            raise ModelLoadError(f"'{self.identity}': the CLIP states ({clip} wide) exceed the transformer's "
                                 f"joint_attention_dim={cfg.joint_attention_dim} — the text encoders are not this model's")
        if not self._weights[1]:
            self._weights = (weights_signature(self), weights_fingerprint(self))

    @classmethod
    def from_pipeline(cls, pipe: Any, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None) -> "SD3Model":
        """The components of a loaded ``StableDiffusion3Pipeline`` (e.g. with LoRA weights loaded)."""
        from tokenflow.models.loading import from_pipeline

        return from_pipeline(pipe, device, dtype)  # type: ignore[return-value]

    # ---- what the model is -----------------------------------------------------------------------
    def components(self) -> dict[str, torch.nn.Module]:
        parts = {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3}
        return {name: part for name, part in parts.items() if part is not None}

    def tokenizers(self) -> list[Any]:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network evaluated at every step (the transformer)."""
        return self.transformer

    def layout(self) -> MMDiTLayout:
        """The transformer's hook sites (joint and image-only attention layers by block), derived from its blocks."""
        return MMDiTLayout.from_transformer(self.transformer)

    @property
    def prediction_type(self) -> str:
        return "flow_velocity"

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        """Image tokens per frame for latents of size ``latent_hw`` (what dynamic σ shifting reads)."""
        h, w = latent_hw
        return (h // self.patch_size) * (w // self.patch_size)

    def check_latent_size(self, latent_hw: tuple[int, int]) -> None:
        h, w = latent_hw
        p = self.patch_size
        if h % p or w % p:
            step = p * self.vae_scale_factor
            raise ConfigError(f"latents of {h}x{w} do not divide into {p}x{p} patches — use a height and width that "
                              f"are multiples of {step} pixels")

    # ---- text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: str | list[str]) -> TextEmbedding:
        """Prompts → :class:`TextEmbedding`: ``hidden`` (n, 77 + T5 tokens, joint_attention_dim) and ``pooled``
        (n, pooled_projection_dim), on the model's device and dtype, as ``StableDiffusion3Pipeline.encode_prompt``
        computes them (the same prompt for all three encoders, no clip skip)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(token_ids(tokenizer, prompts, tokenizer.model_max_length, self.device), output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        width = int(self.transformer.config.joint_attention_dim)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device, dtype=clip.dtype)
        else:
            t5 = self.text_encoder_3(token_ids(self.tokenizer_3, prompts, self.max_sequence_length, self.device))[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip.to(self.dtype), t5.to(self.dtype)], dim=-2)
        return TextEmbedding(hidden, torch.cat(pooled, dim=-1).to(self.dtype))

    # ---- the transformer -------------------------------------------------------------------------
    def predict(self, latents: Tensor, timestep: float, text: TextEmbedding | Tensor, *,
                image_latents: Tensor | None = None, extra: dict[str, Any] | None = None,
                guidance: Tensor | None = None) -> Tensor:
        """The transformer's velocity (B, C, h, w), float32, for ``latents`` (B, C, h, w) at ``timestep`` (σ·T).

        ``text``: (B, L, D) hidden states with (B, P) pooled projections. ``extra``: further transformer
        inputs (e.g. ``joint_attention_kwargs``). Image-conditioned inputs and a guidance input do not exist for
        SD 3 (its guidance is classifier-free, over branches).
        """
        if guidance is not None:
            raise ConfigError("SD 3 has no guidance input (it is guided classifier-free) — drop the branch's guidance")
        if image_latents is not None:
            raise ConfigError("SD 3 takes no extra image channels — editors that need them (ip2p, depth) are SD-UNet only")
        text = as_text_embedding(text)
        if text.pooled is None:
            raise ConfigError("SD 3 needs pooled text projections in every branch — build branch embeddings with "
                              "model.encode_text(...)")
        self.check_latent_size(tuple(latents.shape[-2:]))
        if latents.shape[1] != self.latent_channels:
            raise ConfigError(f"this transformer takes {self.latent_channels} latent channels, the call has "
                              f"{latents.shape[1]} — encode frames with this model's VAE")
        t = torch.full((latents.shape[0],), float(timestep), device=self.device, dtype=self.dtype)
        out = self.transformer(hidden_states=latents.to(self.device, self.dtype), timestep=t,
                               encoder_hidden_states=text.hidden.to(self.device, self.dtype),
                               pooled_projections=text.pooled.to(self.device, self.dtype), return_dict=False,
                               **dict(extra or {}))[0]
        return out.float()
