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
    level: dict[str, int]  # attention layer name (attn1 and attn2) -> 2x downsamplings before it (0: latent size)

    @classmethod
    def from_unet(cls, unet: torch.nn.Module) -> "UNetLayout":
        self_attn: list[str] = []
        cross_attn: list[str] = []
        stage: dict[str, str] = {}
        level: dict[str, int] = {}
        depth = 0
        blocks = [("down", f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
        if getattr(unet, "mid_block", None) is not None:
            blocks.append(("mid", "mid_block", unet.mid_block))
        blocks += [("up", f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
        for where, prefix, block in blocks:
            for name, module in block.named_modules():
                if name.endswith(("attn1", "attn2")) and hasattr(module, "processor"):
                    full = f"{prefix}.{name}"
                    level[full] = depth
                    if name.endswith("attn1"):
                        self_attn.append(full)
                        stage[full] = where
                    else:
                        cross_attn.append(full)
            step = bool(getattr(block, "downsamplers", None)) - bool(getattr(block, "upsamplers", None))
            depth += step
        decoder: list[DecoderLayer] = []
        for b, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None) or []
            for j in range(len(block.resnets)):
                attn = ()
                if j < len(attentions):
                    attn = tuple(f"up_blocks.{b}.attentions.{j}.{n}" for n, m in attentions[j].named_modules()
                                 if n.endswith("attn1") and hasattr(m, "processor"))
                decoder.append(DecoderLayer(len(decoder), f"up_blocks.{b}.resnets.{j}", attn))
        return cls(tuple(self_attn), tuple(cross_attn), tuple(decoder), stage, level)

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

    def pnp_layers(self) -> tuple[list[int], list[int]]:
        """Plug-and-Play's injection sites for this UNet: (residual-feature layers, self-attention layers).

        PnP injects the residual features of the second resnet of the first decoder block that has attention
        and self-attention Q/K from that layer on: decoder layer 4 and layers 4-11 for SD 1.x/2.x (the
        published choice), layer 1 and layers 1-5 for SDXL (the same place: the coarsest attention block).
        """
        first = next((d.index for d in self.decoder if d.self_attention), None)
        if first is None:
            raise ConfigError("this UNet's decoder has no self-attention — PnP needs one")
        conv = first + 1 if first + 1 < len(self.decoder) else first
        return [conv], [d.index for d in self.decoder if d.index >= conv and d.self_attention]

    def decoder_resnet_output(self, index: int) -> str:
        """Name of the conv whose output PnP replaces: ``conv2`` of the decoder layer's resnet (before the skip)."""
        return f"{self.decoder_layer(index).resnet}.conv2"


def check_attention_supported(attn: torch.nn.Module, name: str, what: str) -> None:
    """Refuse attention layers with norms/residuals the library's processors do not reproduce."""
    if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None \
            or getattr(attn, "residual_connection", False) or getattr(attn, "norm_q", None) is not None:
        raise ConfigError(f"attention layer {name} uses norms/residuals the {what} does not support — use a Stable "
                          "Diffusion 1.x/2.x or SDXL UNet")


def token_grid(latent_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """(h, w) of a layer with ``n_tokens`` tokens for latents of size ``latent_hw``.

    Each UNet downsampling (stride-2 conv, padding 1) maps a side n to ceil(n / 2).
    """
    h, w = latent_hw
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens match no downsampling of a {latent_hw} latent")
    return h, w


@dataclass(frozen=True)
class MMDiTLayout:
    """Hook sites of an MMDiT transformer (SD 3 / 3.5, FLUX.1), derived from its blocks: the one place that knows them.

    ``self_attention``: the layers whose image tokens attend to each other, in execution order —
    SD 3: ``transformer_blocks.{i}.attn`` (joint image+text attention) and, in SD 3.5's dual-attention blocks,
    ``transformer_blocks.{i}.attn2`` (image-only); FLUX: the double-stream ``transformer_blocks.{i}.attn``, then
    the single-stream ``single_transformer_blocks.{j}.attn``, whose input is the text and image tokens
    concatenated (``single_stream``). ``block`` maps each to its block index, single-stream blocks numbered on
    after the double-stream ones (FLUX.1: 0-18 double, 19-56 single, the numbering Stable Flow's "vital layers"
    use). ``patch_size``: latent pixels per token side (SD 3: the patch embedding's stride; FLUX: the pipeline's
    2x2 packing). ``rope``: positions enter as rotary embeddings of each layer's queries and keys (FLUX), not
    as absolute embeddings before the blocks (SD 3).
    """

    self_attention: tuple[str, ...]
    block: dict[str, int]
    n_blocks: int
    patch_size: int
    single_stream: frozenset[str] = frozenset()
    rope: bool = False

    cross_attention: tuple[str, ...] = ()  # no separate cross-attention: text enters the joint attention

    @classmethod
    def from_transformer(cls, transformer: torch.nn.Module) -> "MMDiTLayout":
        names: list[str] = []
        block: dict[str, int] = {}
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None:
            raise ConfigError(f"{type(transformer).__name__} has no transformer_blocks — an MMDiT (SD 3, FLUX) "
                              "transformer is needed")
        for i, b in enumerate(blocks):
            for child in ("attn", "attn2"):  # JointTransformerBlock.forward runs attn, then attn2
                module = getattr(b, child, None)
                if module is not None and hasattr(module, "processor"):
                    names.append(f"transformer_blocks.{i}.{child}")
                    block[names[-1]] = i
        single_blocks = getattr(transformer, "single_transformer_blocks", None)
        single: list[str] = []
        for j, b in enumerate(single_blocks or ()):
            names.append(f"single_transformer_blocks.{j}.attn")
            block[names[-1]] = len(blocks) + j
            single.append(names[-1])
        n_blocks = len(blocks) + len(single_blocks or ())
        if single_blocks is not None:  # FLUX: tokens are 2x2 packed latents (the pipeline's packing) of patch 1
            return cls(tuple(names), block, n_blocks, 2 * int(transformer.config.patch_size), frozenset(single), True)
        return cls(tuple(names), block, n_blocks, int(transformer.config.patch_size))

    def blocks_self_attention(self, indices: list[int] | tuple[int, ...]) -> tuple[str, ...]:
        """The image self-attention layers of the given blocks; an index out of range is an error."""
        for i in indices:
            if not 0 <= i < self.n_blocks:
                raise ConfigError(f"block {i} does not exist — this transformer has blocks 0-{self.n_blocks - 1}")
        wanted = set(indices)
        return tuple(n for n in self.self_attention if self.block[n] in wanted)


def patch_grid(latent_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """(h/p, w/p) token grid of a patch-embedded latent of size ``latent_hw`` with ``n_tokens`` tokens (row-major);
    the patch size p is derived from the token count."""
    h, w = latent_hw
    p = round((h * w / n_tokens) ** 0.5) if n_tokens > 0 else 0
    if p < 1 or h % p or w % p or (h // p) * (w // p) != n_tokens:
        raise ValueError(f"{n_tokens} tokens match no patch size of a {latent_hw} latent")
    return h // p, w // p
