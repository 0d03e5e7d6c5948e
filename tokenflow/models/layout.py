"""Hook sites of a UNet, derived from its structure: the one place that knows block indices.

Names are module paths as in ``unet.named_modules()`` (``up_blocks.1.attentions.1.transformer_blocks.0.attn1``).
Decoder layers are numbered as in Plug-and-Play: decoder layer ``n`` is the ``n``-th resnet of the
up path (counting every up block's resnets in execution order) together with the attention that
follows it, if any. For SD 1.5/2.1 (and the tiny model) that is 12 layers, 0-11, of which 3-11 have
attention; PnP injects residual features at layer 4 and self-attention Q/K at layers 4-11.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenflow.errors import ConfigError


@dataclass(frozen=True)
class DecoderLayer:
    index: int
    resnet: str
    self_attention: tuple[str, ...]  # attn1 of every transformer block in the attention that follows


@dataclass(frozen=True)
class UNetLayout:
    """Self-/cross-attention layers in execution order (down, mid, up) and decoder layers."""

    self_attention: tuple[str, ...]
    cross_attention: tuple[str, ...]
    decoder: tuple[DecoderLayer, ...]
    stage: dict[str, str]  # self-attention name -> "down" | "mid" | "up"

    @classmethod
    def from_unet(cls, unet: torch.nn.Module) -> "UNetLayout":
        self_attn: list[str] = []
        cross_attn: list[str] = []
        stage: dict[str, str] = {}
        prefixes = [("down", f"down_blocks.{i}") for i in range(len(unet.down_blocks))]
        if getattr(unet, "mid_block", None) is not None:
            prefixes.append(("mid", "mid_block"))
        prefixes += [("up", f"up_blocks.{i}") for i in range(len(unet.up_blocks))]
        for where, prefix in prefixes:
            block = unet.get_submodule(prefix)
            for name, module in block.named_modules():
                if name.endswith("attn1") and hasattr(module, "processor"):
                    self_attn.append(f"{prefix}.{name}")
                    stage[f"{prefix}.{name}"] = where
                elif name.endswith("attn2") and hasattr(module, "processor"):
                    cross_attn.append(f"{prefix}.{name}")
        decoder: list[DecoderLayer] = []
        for b, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None) or []
            for j in range(len(block.resnets)):
                attn = ()
                if j < len(attentions):
                    attn = tuple(f"up_blocks.{b}.attentions.{j}.{n}" for n, m in attentions[j].named_modules()
                                 if n.endswith("attn1") and hasattr(m, "processor"))
                decoder.append(DecoderLayer(len(decoder), f"up_blocks.{b}.resnets.{j}", attn))
        return cls(tuple(self_attn), tuple(cross_attn), tuple(decoder), stage)

    def decoder_layer(self, index: int) -> DecoderLayer:
        if not 0 <= index < len(self.decoder):
            raise ConfigError(f"decoder layer {index} does not exist — this UNet has decoder layers 0-{len(self.decoder) - 1}")
        return self.decoder[index]

    def decoder_self_attention(self, indices: list[int] | tuple[int, ...]) -> tuple[str, ...]:
        """attn1 names of the given decoder layers; a layer without attention is an error."""
        names: list[str] = []
        for i in indices:
            layer = self.decoder_layer(i)
            if not layer.self_attention:
                with_attn = [d.index for d in self.decoder if d.self_attention]
                raise ConfigError(f"decoder layer {i} has no self-attention — choose among {with_attn}")
            names.extend(layer.self_attention)
        return tuple(names)

    def decoder_resnet_output(self, index: int) -> str:
        """Name of the conv whose output PnP replaces: ``conv2`` of the decoder layer's resnet (before the skip)."""
        return f"{self.decoder_layer(index).resnet}.conv2"
