"""InstructPix2Pix (Brooks et al., 2023) as a TokenFlow keyframe editor: edit by instruction, e.g. "make it snowy".

Branches: ``full`` (instruction + image latents), ``image`` (negative prompt + image latents), ``uncond``
(negative prompt, zero image latents); ε = ε_u + s_T·(ε_full − ε_image) + s_I·(ε_image − ε_u), as diffusers'
``StableDiffusionInstructPix2PixPipeline`` (only ``full`` when s_T <= 1 or s_I < 1, as there). Image latents
are the VAE posterior mode of the input frames without the scaling factor
(:func:`~tokenflow.core.inversion.image_conditioning`). The 8-channel UNet is inverted, and the source
branch run, with the same image latents and the inversion prompt, so the source branch follows the
inversion's trajectory. Needs an InstructPix2Pix checkpoint (e.g. ``timbrooks/instruct-pix2pix``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from tokenflow.core.editor import Branch, EditInputs, KeyframeEditor, Step
from tokenflow.core.inversion import image_conditioning
from tokenflow.options import configured, non_negative
from tokenflow.errors import ConfigError


@dataclass
class InstructPix2PixConfig:
    guidance_scale: float = 7.5         # s_T: text guidance
    image_guidance_scale: float = 1.5   # s_I: image guidance (higher: closer to the input)

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "image_guidance_scale"):
            setattr(self, name, non_negative(getattr(self, name), f"editor.{name}", "7.5 and 1.5 are the usual values"))


@configured
class InstructPix2PixEditor(KeyframeEditor):
    """Three-branch InstructPix2Pix guidance; the prompt is the instruction."""

    families = ("unet",)  # an image-conditioned UNet (latents + image latents)
    Config = InstructPix2PixConfig

    def __init__(self, **config) -> None:
        self.config = InstructPix2PixConfig(**config)

    @property
    def guidance_weight(self) -> float:
        return max(self.config.guidance_scale, self.config.image_guidance_scale)

    @property
    def guided(self) -> bool:
        return self.config.guidance_scale > 1.0 and self.config.image_guidance_scale >= 1.0

    def prepare(self, inputs: EditInputs) -> None:
        model = inputs.model
        image = image_conditioning(model, inputs.inversion.clean)
        if image is None:
            raise ConfigError(f"editor=ip2p needs an InstructPix2Pix UNet (latents + image latents); "
                              f"'{model.identity}' is text-to-image — use e.g. model.source=timbrooks/instruct-pix2pix")
        self._image = image.to(model.device)  # float32, cast with the latents
        text, negative = model.encode_text(inputs.prompt), model.encode_text(inputs.negative_prompt)
        self._branches = [Branch("full", text, image_latents=self._image)]
        if self.guided:
            self._branches += [Branch("image", negative, image_latents=self._image),
                               Branch("uncond", negative, image_latents=self._image[:1] * 0)]

    def check(self, model) -> None:
        if image_conditioning(model, torch.zeros(1, model.latent_channels, 1, 1)) is None:
            raise ConfigError(f"editor=ip2p needs an InstructPix2Pix UNet (latents + image latents); "
                              f"'{model.identity}' is text-to-image — use e.g. model.source=timbrooks/instruct-pix2pix")

    def branch_count(self, model, source: bool) -> int:
        return (3 if self.guided else 1) + int(source)  # full, image, uncond

    def source_branch(self, branch: Branch) -> Branch:
        return replace(branch, image_latents=self._image)  # the source runs the same image-conditioned UNet

    def branches(self, step: Step) -> list[Branch]:
        return self._branches

    def guide(self, eps: dict[str, Tensor], step: Step) -> Tensor:
        if "uncond" not in eps:
            return eps["full"]
        s_t, s_i = self.config.guidance_scale, self.config.image_guidance_scale
        return eps["uncond"] + s_t * (eps["full"] - eps["image"]) + s_i * (eps["image"] - eps["uncond"])
