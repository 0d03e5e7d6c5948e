"""The backbone interface: what the rest of the library may ask of a model (and nothing else).

A backbone wraps one checkpoint family's components and knows how they are called. Two families
implement it: the SD UNet family (:class:`~tokenflow.models.backbone.DiffusionModel`: SD 1.x/2.x,
SDXL, InstructPix2Pix) and the MMDiT family (:class:`~tokenflow.models.mmdit.SD3Model`: SD 3 / 3.5).
Stepping is not the backbone's: :func:`tokenflow.samplers.sampler_for` turns ``scheduler``'s config into
the sampler that converts ``predict``'s raw output to its guidance form and steps the latents.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from tokenflow.models.backbone import TextEmbedding


@runtime_checkable
class Backbone(Protocol):
    """Text encoding, one model call over a batch of branches, VAE coding, and the model's hook sites."""

    family: str                 # "unet" | "mmdit": which attention processors and hook sites apply
    device: torch.device
    dtype: torch.dtype
    identity: str               # where the weights came from (logs)
    fingerprint: str            # what the model computes (caches are keyed on it)
    scheduler: Any              # the checkpoint's scheduler: its config decides the sampler
    vae_batch: int

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network evaluated at every step (UNet or transformer): where processors are installed."""

    @property
    def latent_channels(self) -> int: ...

    @property
    def vae_scale_factor(self) -> int: ...

    def components(self) -> dict[str, torch.nn.Module]:
        """The networks by component name."""

    def tokenizers(self) -> list[Any]: ...

    def layout(self) -> Any:
        """The hook sites derived from the model's config (``UNetLayout`` or ``MMDiTLayout``): which layers hold
        the self-attention TokenFlow extends and propagates, where editors may inject."""

    def encode_text(self, prompts: str | list[str]) -> TextEmbedding: ...

    def predict(self, latents: Tensor, timestep: Any, text: TextEmbedding | Tensor, *,
                image_latents: Tensor | None = None, extra: dict[str, Any] | None = None) -> Tensor:
        """The model's raw output (B, C, h, w), float32, for a batch of latents at one timestep."""

    def encode_images(self, images: Tensor) -> Tensor: ...

    def decode_latents(self, latents: Tensor) -> Tensor: ...
