"""FLUX.1 as a backbone: CLIP-L's pooled embedding and T5's token states, a double/single-stream MMDiT predicting
velocity on 2x2-packed latents, guidance as a model input (dev), a 16-channel VAE.

:class:`FluxModel` is the one place that knows how the components of a diffusers ``FluxPipeline`` folder
are called, exactly as that pipeline calls them: prompts → :class:`~tokenflow.models.backbone.TextEmbedding`
(``hidden``: the T5 encoder's last hidden states, ``max_sequence_length`` tokens; ``pooled``: CLIPTextModel's
``pooler_output``), latents (B, 16, h, w) → packed tokens (B, h/2·w/2, 64) with their (row, column)
position ids (RoPE) and text ids of zeros → the transformer's velocity, unpacked to (B, 16, h, w) float32.
The timestep the transformer reads is σ (the pipeline's ``t / 1000``). FLUX.1-dev is guidance-distilled:
its guidance is an *input* (``guidance_embeds``), one forward per branch, not classifier-free guidance
over a doubled batch; FLUX.1-schnell has neither (``classifier_free`` is False for both: editors run one
branch per prompt). The pipeline spaces σ linearly before shifting (``sigma_spacing = "linear"``).
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
from tokenflow.models.mmdit import token_ids

log = logging.getLogger(__name__)

#: the σ spacing of FluxPipeline (np.linspace(1, 1/n, n) given to the scheduler, then shifted)
FLUX_SIGMA_SPACING = "linear"


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C): 2x2 patches row-major, channels (C, 2, 2) as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """The inverse of :func:`pack_latents` for latents of size ``latent_hw``."""
    b, _, d = tokens.shape
    h, w = latent_hw
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(latent_hw: tuple[int, int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids (h/2·w/2, 3) of the packed tokens: (0, row, column), as ``FluxPipeline._prepare_latent_image_ids``.
    Every frame of a video has the same ids (the same grid)."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


@dataclass
class FluxModel(VAECoding):
    """The components of a FLUX.1 checkpoint on one device and dtype.

    ``identity`` names where the weights came from; ``fingerprint`` identifies what the model computes, as
    for the other families. ``max_sequence_length``: T5 tokens per prompt (the pipeline's default 512; 256 is
    schnell's usual). ``guidance``: the guidance input of a guidance-distilled transformer (FLUX.1-dev) for
    calls whose branch names none (the inversion, the source branch), the pipeline's default 3.5.
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
    max_sequence_length: int = 512
    guidance: float = 3.5
    vae_batch: int = 8
    fingerprint: str = _Fingerprint()  # type: ignore[assignment]

    family = "mmdit"
    is_sdxl = False
    classifier_free = False     # editors do not double the batch for guidance
    sigma_spacing = FLUX_SIGMA_SPACING

    def __post_init__(self) -> None:
        if self.scheduler.__class__.__name__ != "FlowMatchEulerDiscreteScheduler":
            raise ModelLoadError(f"'{self.identity}': a FLUX transformer samples with FlowMatchEulerDiscreteScheduler, "
                                 f"not {type(self.scheduler).__name__} — load the checkpoint's own scheduler")
        cfg = self.transformer.config
        if int(self.text_encoder_2.config.d_model) != int(cfg.joint_attention_dim):
            raise ModelLoadError(f"'{self.identity}': the T5 states ({self.text_encoder_2.config.d_model} wide) are not "
                                 f"the transformer's joint_attention_dim={cfg.joint_attention_dim} — the text encoders "
                                 "are not this model's")
        if int(cfg.in_channels) % 4:
            raise ModelLoadError(f"'{self.identity}': in_channels={cfg.in_channels} is not 2x2-packed latents")
        if not self._weights[1]:
            self._weights = (weights_signature(self), weights_fingerprint(self))

    @classmethod
    def from_pipeline(cls, pipe: Any, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None) -> "FluxModel":
        """The components of a loaded ``FluxPipeline`` (e.g. with LoRA weights loaded)."""
        from tokenflow.models.loading import from_pipeline

        return from_pipeline(pipe, device, dtype)  # type: ignore[return-value]

    # ---- what the model is -----------------------------------------------------------------------
    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2}

    def tokenizers(self) -> list[Any]:
        return [self.tokenizer, self.tokenizer_2]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network evaluated at every step (the transformer)."""
        return self.transformer

    def layout(self) -> MMDiTLayout:
        """The transformer's hook sites (double- then single-stream attention layers), derived from its blocks."""
        return MMDiTLayout.from_transformer(self.transformer)

    @property
    def prediction_type(self) -> str:
        return "flow_velocity"

    @property
    def guidance_embedded(self) -> bool:
        """Whether the transformer reads a guidance input (FLUX.1-dev), not schnell."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    @property
    def patch_size(self) -> int:
        return 2

    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        """Image tokens per frame (packed 2x2) for latents of ``latent_hw`` (what dynamic σ shifting reads)."""
        return (latent_hw[0] // 2) * (latent_hw[1] // 2)

    def check_latent_size(self, latent_hw: tuple[int, int]) -> None:
        h, w = latent_hw
        if h % 2 or w % 2:
            raise ConfigError(f"latents of {h}x{w} do not pack into 2x2 tokens — use a height and width that are "
                              f"multiples of {2 * self.vae_scale_factor} pixels")

    # ---- text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: str | list[str]) -> TextEmbedding:
        """Prompts → :class:`TextEmbedding`: ``hidden`` (n, max_sequence_length, joint_attention_dim), T5's last
        hidden states, and ``pooled`` (n, 768): CLIP's pooler output, as ``FluxPipeline.encode_prompt`` computes
        them (the same prompt for both encoders)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_ids = token_ids(self.tokenizer, prompts, int(self.tokenizer.model_max_length), self.device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = token_ids(self.tokenizer_2, prompts, self.max_sequence_length, self.device)
        hidden = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return TextEmbedding(hidden.to(self.dtype), pooled.to(self.dtype))

    # ---- the transformer -------------------------------------------------------------------------
    def predict(self, latents: Tensor, timestep: float, text: TextEmbedding | Tensor, *,
                image_latents: Tensor | None = None, extra: dict[str, Any] | None = None,
                guidance: Tensor | None = None) -> Tensor:
        """The transformer's velocity (B, C, h, w), float32, for ``latents`` (B, C, h, w) at ``timestep`` (σ·T).

        ``guidance``: (B,) guidance inputs of a guidance-distilled model, one per row (default :attr:`guidance`
        for every row); refused on a model without a guidance embedding. ``extra``: further transformer inputs
        (e.g. ``joint_attention_kwargs``).
        """
        if image_latents is not None:
            raise ConfigError("FLUX takes no extra image channels — editors that need them (ip2p, depth) are SD-UNet only")
        text = as_text_embedding(text)
        if text.pooled is None:
            raise ConfigError("FLUX needs pooled text projections in every branch — build branch embeddings with "
                              "model.encode_text(...)")
        hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        self.check_latent_size(hw)
        if latents.shape[1] != self.latent_channels:
            raise ConfigError(f"this transformer takes {self.latent_channels} latent channels, the call has "
                              f"{latents.shape[1]} — encode frames with this model's VAE")
        n = latents.shape[0]
        if self.guidance_embedded:
            g = torch.full((n,), float(self.guidance)) if guidance is None else torch.as_tensor(guidance).float()
            if g.shape != (n,):
                raise ConfigError(f"guidance has shape {tuple(g.shape)} for a batch of {n} — give one value per row")
            g = g.to(self.device)  # the pipeline builds it in float32; the transformer casts it with the latents
        elif guidance is not None:
            raise ConfigError(f"'{self.identity}' has no guidance input (guidance_embeds=false, e.g. FLUX.1-schnell) — "
                              "drop the guidance setting")
        else:
            g = None
        hidden = text.hidden.to(self.device, self.dtype)
        sigma = torch.full((n,), float(timestep), device=self.device, dtype=self.dtype) / 1000
        out = self.transformer(hidden_states=pack_latents(latents.to(self.device, self.dtype)), timestep=sigma,
                               guidance=g, pooled_projections=text.pooled.to(self.device, self.dtype),
                               encoder_hidden_states=hidden,
                               txt_ids=torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype),
                               img_ids=image_ids(hw, self.device, self.dtype), return_dict=False,
                               **dict(extra or {}))[0]
        return unpack_latents(out, hw).float()
