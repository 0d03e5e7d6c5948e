"""The diffusion backbone as TokenFlow uses it: text conditioning, one UNet noise prediction, VAE coding.

:class:`DiffusionModel` wraps the components of a Stable Diffusion 1.x/2.x or SDXL checkpoint and is
the one place that knows how they are called: prompts → :class:`TextEmbedding` (SDXL: two text
encoders' penultimate states concatenated, plus the pooled embedding its added conditioning needs),
latents → noise ε (any ``prediction_type``, float32 latents in and out, only the UNet's inputs cast
to the model's dtype), images ↔ latents (the VAE in float32 where its config asks for it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.models.ddim import alpha_bar, check_scheduler, clip_range, ddim_step, to_epsilon
from tokenflow.models.fingerprint import model_fingerprint, weights_fingerprint, weights_signature

if TYPE_CHECKING:
    from tokenflow.models.layout import UNetLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEmbedding:
    """Text conditioning of a UNet call: ``hidden`` (n, L, D) and, for SDXL, ``pooled`` (n, P).

    n is 1 (one prompt shared by every frame) or the number of frames of the video (e.g. null-text
    embeddings, one per frame); :meth:`rows` turns it into the rows of a call's frames.
    """

    hidden: Tensor
    pooled: Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def rows(self, frames: Tensor) -> "TextEmbedding":
        """The embedding of each frame in ``frames`` (F,): per-frame rows, or the shared one repeated."""
        def pick(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if t.shape[0] == 1:
                return t.expand(len(frames), *t.shape[1:])
            return t[frames.to(t.device)]
        return TextEmbedding(pick(self.hidden), pick(self.pooled))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEmbedding":
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return TextEmbedding(self.hidden.to(device, dtype), pooled)

    @staticmethod
    def cat(parts: list["TextEmbedding"]) -> "TextEmbedding":
        """Rows of several embeddings stacked (a batch over branches); all or none carry ``pooled``."""
        pooled = [p.pooled for p in parts]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ConfigError("some branches carry a pooled text embedding and some do not — build every branch's "
                              "embedding with model.encode_text(...)")
        return TextEmbedding(torch.cat([p.hidden for p in parts]),
                             None if pooled[0] is None else torch.cat(pooled))  # type: ignore[arg-type]


def as_text_embedding(value: TextEmbedding | Tensor) -> TextEmbedding:
    """Accept a bare (n, L, D) tensor where a :class:`TextEmbedding` is expected (SD 1.x/2.x branches)."""
    return value if isinstance(value, TextEmbedding) else TextEmbedding(value)


class _Fingerprint:
    """``DiffusionModel.fingerprint``: the weights' digest combined, on every read, with the state of the model's
    peft adapters, so enabling, disabling or re-weighting a LoRA changes it. The digest (every weight read) is
    kept with a :func:`weights_signature` and computed again only when that changes (weights added, replaced
    or written in place since); a ``fingerprint`` given to the constructor stands for the weights it was given with.
    """

    def __get__(self, model: "DiffusionModel | None", owner: type | None = None) -> str:
        if model is None:
            return ""  # the dataclass default: "" means "read the weights in __post_init__"
        current = weights_signature(model)
        if current != model._weights[0]:
            model._weights = (current, weights_fingerprint(model))
        return model_fingerprint(model, weights=model._weights[1])

    def __set__(self, model: "DiffusionModel", value: str) -> None:
        model._weights = (weights_signature(model) if value else (), value)


class VAECoding:
    """Images ↔ latents through a backbone's ``vae`` (``vae_batch`` frames per call), shared by every family:
    latents = (posterior mean − ``shift_factor``) × ``scaling_factor`` (SD's VAEs have no shift; SD 3's has)."""

    vae: torch.nn.Module
    device: torch.device
    vae_batch: int

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [-1, 1] → latents (N, C, H/8, W/8) float32: (posterior mean − shift) × scale."""
        latents = []
        for chunk in images.split(self.vae_batch):
            mean = self.vae.encode(chunk.to(self.device, self.vae_dtype)).latent_dist.mean.float()
            if self.latent_shift:
                mean = mean - self.latent_shift
            latents.append(mean * self.latent_scale)
        return torch.cat(latents).contiguous()  # the VAE may hand back channels-last; keep one memory layout

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents (N, C, h, w) → images (N, 3, 8h, 8w) in [-1, 1], float32 on CPU."""
        images = []
        for chunk in latents.split(self.vae_batch):
            z = chunk.to(self.device, self.vae_dtype) / self.latent_scale
            if self.latent_shift:
                z = z + self.latent_shift
            images.append(self.vae.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(images)


@dataclass
class DiffusionModel(VAECoding):
    """The components TokenFlow needs, on one device and dtype.

    ``identity`` names where the weights came from (for logs); ``fingerprint`` identifies the model by
    what it computes (every weight, every config, the dtype, the active peft adapters and their scales)
    so caches keyed on it never mix two models. The weights are read at construction (a given
    ``fingerprint`` stands for them) and again only after they change; the adapters' state is read each
    time ``fingerprint`` is.
    ``text_encoder_2``/``tokenizer_2`` are set for SDXL.
    """

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    unet: torch.nn.Module
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    identity: str
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    vae_batch: int = 8
    fingerprint: str = _Fingerprint()  # type: ignore[assignment]  # a descriptor-typed field (see _Fingerprint)

    def __post_init__(self) -> None:
        check_scheduler(self.scheduler)
        check_architecture(self.unet, self.text_encoder_2)
        if self.is_sdxl and (self.text_encoder_2 is None or self.tokenizer_2 is None):
            raise ModelLoadError(f"'{self.identity}' has an SDXL UNet but no text_encoder_2/tokenizer_2 — load the whole "
                                 "SDXL pipeline folder")
        if not self._weights[1]:
            self._weights = (weights_signature(self), weights_fingerprint(self))

    @classmethod
    def from_pipeline(cls, pipe: Any, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None) -> "DiffusionModel":
        """The components of a loaded diffusers (SD or SDXL) pipeline, e.g. with LoRA weights loaded."""
        from tokenflow.models.loading import from_pipeline

        return from_pipeline(pipe, device, dtype)

    family = "unet"

    # ---- what kind of model ----------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network evaluated at every step (the UNet)."""
        return self.unet

    def components(self) -> dict[str, torch.nn.Module]:
        """The model's networks by component name (what the fingerprint reads)."""
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2}
        return {name: part for name, part in parts.items() if part is not None}

    def tokenizers(self) -> list[Any]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    def layout(self) -> "UNetLayout":
        """The UNet's hook sites (self-/cross-attention layers, decoder layers), derived from its structure."""
        from tokenflow.models.layout import UNetLayout

        return UNetLayout.from_unet(self.unet)

    @property
    def is_sdxl(self) -> bool:
        """The UNet takes SDXL's added time/text conditioning."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    # ---- text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: str | list[str]) -> TextEmbedding:
        """Prompts → :class:`TextEmbedding` (n, L, D) on the model's device and dtype.

        SD 1.x/2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden states
        concatenated, and the second encoder's projected pooled output (as diffusers' SDXL pipelines).
        A prompt longer than the tokenizer's limit is cut, with a warning naming what was dropped.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.is_sdxl:
            ids = self._token_ids(self.tokenizer, prompts)
            return TextEmbedding(self.text_encoder(ids)[0].to(self.dtype))
        states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            states.append(out.hidden_states[-2])
        if pooled is None:
            raise ModelLoadError(f"'{self.identity}': text_encoder_2 gives no pooled embedding — SDXL needs a "
                                 "CLIPTextModelWithProjection there")
        return TextEmbedding(torch.cat(states, dim=-1).to(self.dtype), pooled.to(self.dtype))

    def _token_ids(self, tokenizer, prompts: list[str]) -> Tensor:
        limit = tokenizer.model_max_length
        for prompt in prompts:
            ids = tokenizer(prompt, truncation=False).input_ids
            if len(ids) > limit:
                dropped = tokenizer.decode(ids[limit - 1 : -1])
                log.warning("prompt %r is longer than the text encoder's %d tokens; dropped: %r", prompt, limit, dropped)
        tokens = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        return tokens.input_ids.to(self.device)

    # ---- the UNet --------------------------------------------------------------------------------
    def alpha(self, t: int) -> float:
        """ᾱ_t of the scheduler (t < 0: the final ᾱ, one step below the grid)."""
        return alpha_bar(self.scheduler, t)

    def ddim_step(self, x: Tensor, eps: Tensor, t_from: int, t_to: int) -> Tensor:
        """DDIM from the noise level of ``t_from`` to that of ``t_to`` (either direction), float32."""
        return ddim_step(x, eps, self.alpha(t_from), self.alpha(t_to), clip_range(self.scheduler))

    def predict(self, latents: Tensor, t: int, text: TextEmbedding | Tensor, *, image_latents: Tensor | None = None,
                extra: dict[str, Any] | None = None) -> Tensor:
        """The UNet's raw output (B, C, h, w), float32, for ``latents`` (B, C, h, w) at timestep ``t``, in the
        checkpoint's ``prediction_type`` (the sampler converts it to the form it steps with).

        ``text``: (B, L, D) conditioning. ``image_latents`` (B, C', h, w): extra input channels (InstructPix2Pix,
        depth), concatenated. ``extra``: further UNet inputs (e.g. ControlNet residuals). Differentiable (null-text).
        """
        text = as_text_embedding(text)
        x = latents if image_latents is None else torch.cat([latents, image_latents.to(latents)], dim=1)
        expected = self.unet.config.in_channels
        if x.shape[1] != expected:
            raise ConfigError(f"this UNet takes {expected} input channels but the call has {x.shape[1]} "
                              f"({latents.shape[1]} latent + {x.shape[1] - latents.shape[1]} image) — "
                              + ("an inpainting or image-conditioned UNet needs an editor that supplies its extra "
                                 "channels (e.g. editor=ip2p), or use a text-to-image checkpoint"
                                 if expected > latents.shape[1] else "use a text-to-image checkpoint"))
        kwargs = dict(extra or {})
        if self.is_sdxl:
            if text.pooled is None:
                raise ConfigError("SDXL needs a pooled text embedding in every branch — build branch embeddings with "
                                  "model.encode_text(...), not bare tensors")
            kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled.to(self.device, self.dtype),
                                           "time_ids": self.time_ids(x.shape[0], tuple(latents.shape[-2:]))}
        out = self.unet(x.to(self.device, self.dtype), t, encoder_hidden_states=text.hidden.to(self.device, self.dtype),
                        **kwargs).sample
        return out.float()

    def predict_noise(self, latents: Tensor, t: int, text: TextEmbedding | Tensor, *, level: int | None = None,
                      image_latents: Tensor | None = None, unet_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The noise ε (B, C, h, w), float32, the UNet predicts for ``latents`` at timestep ``t``: :meth:`predict`
        converted from the checkpoint's ``prediction_type`` at the noise level of ``level`` (default ``t``;
        inversion evaluates the UNet one step above the latents' level)."""
        out = self.predict(latents, t, text, image_latents=image_latents, extra=unet_kwargs)
        return to_epsilon(out, latents.to(out.device), self.alpha(t if level is None else level), self.prediction_type)

    def time_ids(self, batch: int, latent_hw: tuple[int, int]) -> Tensor:
        """SDXL micro-conditioning (B, 6): original size, crop (0, 0), target size — the frame's own size."""
        h, w = (s * self.vae_scale_factor for s in latent_hw)
        ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype)
        return ids.expand(batch, -1)


def check_architecture(unet: torch.nn.Module, text_encoder_2: torch.nn.Module | None = None) -> None:
    """Refuse, in one line, a UNet whose conditioning this library does not drive."""
    cfg = unet.config
    added = getattr(cfg, "addition_embed_type", None)
    if added not in (None, "text_time"):
        raise ModelLoadError(f"UNet addition_embed_type={added!r} is not supported — SD 1.x/2.x (none) and SDXL "
                             "('text_time') are")
    if getattr(cfg, "class_embed_type", None) is not None or getattr(cfg, "num_class_embeds", None):
        raise ModelLoadError("this UNet is class-conditioned (e.g. an upscaler) — use a text-to-image checkpoint")
    if getattr(cfg, "encoder_hid_dim_type", None) is not None:
        raise ModelLoadError(f"UNet encoder_hid_dim_type={cfg.encoder_hid_dim_type!r} (an image-prompt/IF-style UNet) "
                             "is not supported — use a Stable Diffusion 1.x/2.x or SDXL checkpoint")
    if added == "text_time" and text_encoder_2 is not None:
        needed = unet.add_embedding.linear_1.in_features
        proj = getattr(text_encoder_2.config, "projection_dim", None)
        if proj is None or cfg.addition_time_embed_dim * 6 + proj != needed:
            raise ModelLoadError("this SDXL UNet expects a different added conditioning (an SDXL refiner with aesthetic "
                                 "scores?) — use an SDXL base checkpoint")
