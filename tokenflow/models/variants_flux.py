"""The published configurations of FLUX.1-dev and FLUX.1-schnell, and their tiny variants.

A :class:`FluxCheckpoint` holds what a diffusers folder of a FLUX.1 checkpoint says about itself:
transformer (``FluxTransformer2DModel``: 19 double-stream and 38 single-stream blocks, RoPE over
(index, row, column) axes of 16 + 56 + 56 = 128 = the head width, latents 2x2-packed by the pipeline
into 64 channels), VAE (SD3's shape, FLUX's own scaling and shift), two text encoders (CLIP ViT-L/14 as a
plain ``CLIPTextModel``, whose ``pooler_output`` is the pooled embedding — no projection — and the T5 v1.1
XXL encoder), their tokenizers, scheduler and ``model_index.json``. Values are transcribed from the
published ``config.json`` files (no hub access here), the source of each named next to it, as in
:mod:`tokenflow.models.variants_mmdit`; tests/test_tiny_flux.py checks them against the published
parameter counts (built on the meta device). dev and schnell differ only in the guidance embedder
(dev is guidance-distilled: guidance is a model input) and the scheduler (dev: resolution-dependent
shift; schnell: none, it is timestep-distilled for 1-4 steps).

:func:`tiny_flux` turns a checkpoint into its tiny variant (see its docstring for what changes and why).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from tokenflow.errors import ConfigError
from tokenflow.models.variants import _CLIP_L, _TOKENIZER_EOS_PAD, _div
from tokenflow.models.variants_mmdit import _T5_XXL, _TOKENIZER_T5, _VAE_SD3, BYT5_VOCAB_SIZE, TINY_T5_LAYERS

# ---- shared pieces ------------------------------------------------------------------------------------

# transformer/config.json fields dev and schnell share: patch 1 on the pipeline's 2x2-packed latents (16 x 4 = 64
# channels in; out_channels null = in_channels), 19 double-stream + 38 single-stream blocks, 24 heads x 128 = 3072,
# T5-XXL's 4096-wide states as context, CLIP-L's 768-d pooled output. axes_dims_rope is not in the files: it is
# FluxTransformer2DModel's default (16, 56, 56), the reference implementation's axes_dim (flux/util.py).
_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}
# vae/config.json of both (one autoencoder, "ae.safetensors"): SD3's shape — 16 latent channels, no quant_conv /
# post_quant_conv, fp16 overflow (force_upcast) — with FLUX's normalisation (z - 0.1159) * 0.3611.
_VAE_FLUX: dict[str, Any] = {**_VAE_SD3, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# text_encoder/config.json: openai/clip-vit-large-patch14's text tower, architectures CLIPTextModel (the pooled
# embedding is pooler_output, the final-norm EOS state; projection_dim 768 is listed but has no weights here).
_FLUX_CLIP_L: dict[str, Any] = dict(_CLIP_L)
# text_encoder_2/config.json: google/t5-v1_1-xxl's encoder (architectures T5EncoderModel), as SD3's text_encoder_3.
_FLUX_T5: dict[str, Any] = dict(_T5_XXL)
# tokenizer/: CLIP BPE, model_max_length 77, padded with <|endoftext|> (special_tokens_map.json);
# tokenizer_2/: T5's SentencePiece tokenizer, T5TokenizerFast, model_max_length 512 (tokenizer_config.json).
_FLUX_TOKENIZERS = ({"_class_name": "CLIPTokenizer", **_TOKENIZER_EOS_PAD}, dict(_TOKENIZER_T5))
# scheduler/scheduler_config.json fields both list: rectified flow, Euler, 1000 training steps; the dynamic
# shift's range (mu from 0.5 at 256 image tokens to 1.15 at 4096, linear in between).
_FLUX_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
# The classes of the two text-encoder slots, as both model_index.json files list them.
FLUX_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "T5EncoderModel")


@dataclass(frozen=True)
class FluxCheckpoint:
    """What a diffusers folder of one FLUX.1 checkpoint says about its components (configs as in its JSON files).

    ``text_encoders`` are CLIP-L (``CLIPTextModel``) and the T5 encoder (``T5EncoderModel``); ``tokenizers``
    carry their ``_class_name``, as does ``scheduler``. ``index`` holds the pipeline class of
    ``model_index.json`` (components are listed from the rest).
    """

    name: str
    hub_id: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], dict[str, Any]]
    tokenizers: tuple[dict[str, Any], dict[str, Any]]
    scheduler: dict[str, Any]
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def guidance_embeds(self) -> bool:
        """Whether guidance is a model input (FLUX.1-dev, guidance-distilled)."""
        return bool(self.transformer["guidance_embeds"])


# ---- the checkpoints ----------------------------------------------------------------------------------

FLUX_DEV = FluxCheckpoint(
    name="flux-dev",
    hub_id="black-forest-labs/FLUX.1-dev",
    # transformer/config.json: guidance_embeds true — the guidance scale enters through a timestep-like embedder.
    transformer={**_FLUX_TRANSFORMER, "guidance_embeds": True},
    vae=dict(_VAE_FLUX),  # vae/config.json
    text_encoders=(_FLUX_CLIP_L, _FLUX_T5),
    tokenizers=_FLUX_TOKENIZERS,
    # scheduler/scheduler_config.json: shift 3.0 listed, but use_dynamic_shifting true: the pipeline passes mu
    # (from the image's token count) and the static shift is not used.
    scheduler={**_FLUX_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True},
    index={"_class_name": "FluxPipeline"},  # model_index.json (no flags)
)

FLUX_SCHNELL = FluxCheckpoint(
    name="flux-schnell",
    hub_id="black-forest-labs/FLUX.1-schnell",
    # transformer/config.json: guidance_embeds false (no guidance embedder; timestep-distilled).
    transformer={**_FLUX_TRANSFORMER, "guidance_embeds": False},
    vae=dict(_VAE_FLUX),  # vae/config.json (the same autoencoder as dev's)
    text_encoders=(_FLUX_CLIP_L, _FLUX_T5),
    tokenizers=_FLUX_TOKENIZERS,
    # scheduler/scheduler_config.json: shift 1.0, no dynamic shifting (sigmas as spaced).
    scheduler={**_FLUX_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False},
    index={"_class_name": "FluxPipeline"},  # model_index.json (no flags)
)

FLUX_CHECKPOINTS: dict[str, FluxCheckpoint] = {c.name: c for c in (FLUX_DEV, FLUX_SCHNELL)}


def flux_checkpoint(name: str) -> FluxCheckpoint:
    """The FLUX.1 checkpoint called ``name`` (flux-dev, flux-schnell); one clear error otherwise."""
    if name not in FLUX_CHECKPOINTS:
        raise ConfigError(f"FLUX model variant {name!r} is unknown — use one of {', '.join(FLUX_CHECKPOINTS)}")
    return FLUX_CHECKPOINTS[name]


# ---- tiny variants ------------------------------------------------------------------------------------

# The tiny transformer's double-stream depth; single-stream blocks keep the published 1:2 ratio (6 : 12).
TINY_FLUX_DOUBLE_LAYERS = 6
# Head count and head width are both divided by this: 24 x 128 → 6 x 32 = 192 wide, RoPE axes 16:56:56 → 4:14:14
# (4 is the largest divisor that leaves every axis even, as diffusers' get_1d_rotary_pos_embed needs).
TINY_FLUX_HEAD_DIVISOR = 4


def _shrunk(cfg: dict[str, Any], keys: tuple[str, ...], divisor: int, what: str) -> dict[str, Any]:
    """``cfg`` with the widths ``keys`` divided by ``divisor`` (one clear error where one does not divide)."""
    out = copy.deepcopy(cfg)
    for k in keys:
        value = out[k]
        out[k] = [_div(v, divisor, f"{what}.{k}") for v in value] if isinstance(value, (list, tuple)) \
            else _div(value, divisor, f"{what}.{k}")
    return out


def tiny_flux(ckpt: FluxCheckpoint, divisor: int = 8, head_divisor: int = TINY_FLUX_HEAD_DIVISOR,
              double_layers: int = TINY_FLUX_DOUBLE_LAYERS) -> FluxCheckpoint:
    """``ckpt`` with tiny widths, a shallower transformer, and everything else as published.

    Transformer: head count and head width divided by ``head_divisor`` (24 x 128 → 6 x 32 = 192 wide) and
    ``axes_dims_rope`` with them (16:56:56 → 4:14:14: proportional, each even, summing to the head width);
    ``joint_attention_dim`` follows the tiny T5's ``d_model`` and ``pooled_projection_dim`` the tiny CLIP's
    ``hidden_size`` (FLUX pools CLIP-L's ``pooler_output``). Its depth becomes ``double_layers`` double-stream
    and twice as many single-stream blocks (the published 19 : 38 ratio): at full depth one forward (1 x 16 x 8
    x 8 latents = 16 packed tokens, 64 text tokens, one CPU thread) took 0.145 s and 47 M parameters (187 MB),
    at 6 : 12 it takes 0.047 s and 15 M; every structural feature of both block kinds is kept (the double
    blocks' separate text/image weights and joint attention, the single blocks' fused attention + MLP over
    the concatenated tokens, QK RMS-norm, RoPE, the modulation). Patch size, in-channels (the 2x2 packing),
    ``guidance_embeds``, the scheduler and the VAE's scaling and shift factors are as published.
    CLIP-L: widths / ``divisor``, depth kept. T5: widths / ``divisor``, ``TINY_T5_LAYERS`` layers and the
    ByT5 vocabulary, as :func:`~tokenflow.models.variants_mmdit.tiny_mmdit` does (``ByT5Tokenizer`` replaces
    T5's SentencePiece tokenizer, whose model file cannot be had offline). VAE: widths / ``divisor``.
    """
    if divisor < 1 or head_divisor < 1 or double_layers < 1:
        raise ConfigError(f"tiny FLUX divisor {divisor}, head_divisor {head_divisor} and double_layers "
                          f"{double_layers} must be >= 1 — use the defaults 8, 4, 6")
    pub = ckpt.transformer
    transformer = _shrunk(pub, ("attention_head_dim", "num_attention_heads", "axes_dims_rope"), head_divisor,
                          "transformer")
    axes = transformer["axes_dims_rope"]
    if any(a % 2 for a in axes) or sum(axes) != transformer["attention_head_dim"]:
        raise ConfigError(f"tiny RoPE axes {axes} must be even and sum to the head width "
                          f"{transformer['attention_head_dim']} — use head_divisor {TINY_FLUX_HEAD_DIVISOR}")
    transformer["axes_dims_rope"] = tuple(axes)
    transformer["num_layers"] = double_layers
    transformer["num_single_layers"] = double_layers * pub["num_single_layers"] // pub["num_layers"]
    clip, t5 = ckpt.text_encoders
    clip = _shrunk(clip, ("hidden_size", "intermediate_size", "projection_dim"), divisor, "text_encoders[0]")
    t5 = {**_shrunk(t5, ("d_model", "d_ff", "d_kv"), divisor, "text_encoders[1]"), "vocab_size": BYT5_VOCAB_SIZE,
          "num_layers": TINY_T5_LAYERS, "num_decoder_layers": TINY_T5_LAYERS}
    transformer["joint_attention_dim"] = t5["d_model"]
    transformer["pooled_projection_dim"] = clip["hidden_size"]
    vae = _shrunk(ckpt.vae, ("block_out_channels", "norm_num_groups"), divisor, "vae")
    tokenizers = (ckpt.tokenizers[0], {**ckpt.tokenizers[1], "_class_name": "ByT5Tokenizer"})
    return replace(ckpt, name=f"tiny-{ckpt.name}", transformer=transformer, vae=vae, text_encoders=(clip, t5),
                   tokenizers=tokenizers)
