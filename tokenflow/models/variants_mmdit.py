"""The published configurations of Stable Diffusion 3 Medium and 3.5 Medium, and their tiny variants.

A :class:`TransformerCheckpoint` holds what a diffusers folder of an MMDiT checkpoint says about
itself: transformer, VAE, three text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, both with
their projections, and the T5 v1.1 XXL encoder), their tokenizers, scheduler and
``model_index.json``. Values are transcribed from the published ``config.json`` files (no hub
access here), the source of each named next to it, as in :mod:`tokenflow.models.variants`;
tests/test_tiny_mmdit.py checks the transcriptions against the published parameter counts (built on
the meta device).

:func:`tiny_mmdit` turns a checkpoint into its tiny variant: every width divided by ``divisor``
(head counts kept, so head widths 64 → 8) and everything else as published: depth, patch size,
latent channels, MMDiT-X dual attention layers, QK RMS-norm, ``pos_embed_max_size``, the scheduler's
shift, the VAE's scaling and shift factors and its missing quant convs, tokenizer padding. The T5
slot is a tiny ``T5EncoderModel`` read by ``transformers.ByT5Tokenizer`` (which needs no vocabulary
file), its vocabulary cut to the ByT5 ids.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from tokenflow.errors import ConfigError
from tokenflow.models.variants import _CLIP_BIGG, _CLIP_L, _TOKENIZER_EOS_PAD, _TOKENIZER_ZERO_PAD, _div

# ---- shared pieces ------------------------------------------------------------------------------------

# transformer/config.json fields SD3 Medium and SD3.5 Medium share (24 heads x 64 = 1536 = caption_projection_dim;
# the CLIP pair's pooled 768 + 1280 = 2048; T5-XXL's 4096-wide states are the joint context).
_MMDIT_COMMON: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
}
# vae/config.json of both (SD3.5 Medium ships SD3's VAE): 16 latent channels, no quant_conv / post_quant_conv,
# latents normalised as (z - shift_factor) * scaling_factor, overflows in fp16 (force_upcast).
_VAE_SD3: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
}
# text_encoder/config.json: CLIP ViT-L/14 (as SD 1.5's) with its 768-d projection (CLIPTextModelWithProjection).
_SD3_CLIP_L: dict[str, Any] = dict(_CLIP_L)
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14 with its projection, SDXL's text_encoder_2.
_SD3_CLIP_G: dict[str, Any] = dict(_CLIP_BIGG)
# text_encoder_3/config.json: the T5 v1.1 XXL encoder (google/t5-v1_1-xxl's config, architectures T5EncoderModel).
_T5_XXL: dict[str, Any] = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "num_decoder_layers": 24,
    "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True, "vocab_size": 32128,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-06,
    "dropout_rate": 0.1, "initializer_factor": 1.0, "tie_word_embeddings": False, "is_encoder_decoder": True,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}
# Tokenizers: CLIP-L pads with <|endoftext|>, CLIP-G with "!" (id 0) — SD3's reference sampler (sd3_infer.py)
# pads CLIP-G with 0 (SDXLClipGTokenizer, pad_with_end=False), as SDXL's tokenizer_2; tokenizer_3 is T5's
# SentencePiece tokenizer (tokenizer_3/tokenizer_config.json, model_max_length 512).
_TOKENIZER_T5: dict[str, Any] = {"_class_name": "T5TokenizerFast", "model_max_length": 512}
_TOKENIZERS = ({"_class_name": "CLIPTokenizer", **_TOKENIZER_EOS_PAD},
               {"_class_name": "CLIPTokenizer", **_TOKENIZER_ZERO_PAD}, _TOKENIZER_T5)
# scheduler/scheduler_config.json of both: rectified flow, Euler, a static shift of 3.0 (no dynamic shifting).
_SCHEDULER: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                              "shift": 3.0}

# The classes of the three text-encoder slots, as both model_index.json files list them.
TEXT_ENCODER_CLASSES = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
# ByT5's ids: pad 0, eos 1, unk 2, the 256 bytes (3..258) and 125 sentinel ids <extra_id_*> = 384 = len(ByT5Tokenizer()).
BYT5_VOCAB_SIZE = 3 + 256 + 125


@dataclass(frozen=True)
class TransformerCheckpoint:
    """What a diffusers folder of one MMDiT checkpoint says about its components (configs as in its JSON files).

    ``text_encoders`` are CLIP-L, CLIP-G (both ``CLIPTextModelWithProjection``) and the T5 encoder
    (``T5EncoderModel``); ``tokenizers`` carry their ``_class_name``, as does ``scheduler``. ``index`` holds
    the pipeline class and flags of ``model_index.json`` (components are listed from the rest).
    """

    name: str
    hub_id: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
    tokenizers: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
    scheduler: dict[str, Any]
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def dual_attention_layers(self) -> tuple[int, ...]:
        return tuple(self.transformer.get("dual_attention_layers", ()))


# ---- the checkpoints ----------------------------------------------------------------------------------

SD3_MEDIUM = TransformerCheckpoint(
    name="sd3-medium",
    hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
    # transformer/config.json: MMDiT, 24 joint blocks, a 192 x 192 positional table, no QK norm, no dual attention.
    transformer={**_MMDIT_COMMON, "pos_embed_max_size": 192},
    vae=dict(_VAE_SD3),  # vae/config.json
    text_encoders=(_SD3_CLIP_L, _SD3_CLIP_G, _T5_XXL),
    tokenizers=_TOKENIZERS,
    scheduler=dict(_SCHEDULER),  # scheduler/scheduler_config.json
    index={"_class_name": "StableDiffusion3Pipeline"},  # model_index.json (no flags)
)

SD35_MEDIUM = TransformerCheckpoint(
    name="sd35-medium",
    hub_id="stabilityai/stable-diffusion-3.5-medium",
    # transformer/config.json: MMDiT-X — a second, image-only attention in the first 13 blocks (0..12), QK
    # RMS-norm, a 384 x 384 positional table (mixed-resolution training up to 1440 px).
    transformer={**_MMDIT_COMMON, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                 "dual_attention_layers": tuple(range(13))},
    vae=dict(_VAE_SD3),  # vae/config.json (SD3's)
    text_encoders=(_SD3_CLIP_L, _SD3_CLIP_G, _T5_XXL),
    tokenizers=_TOKENIZERS,
    scheduler=dict(_SCHEDULER),  # scheduler/scheduler_config.json (same as SD3's)
    index={"_class_name": "StableDiffusion3Pipeline"},  # model_index.json (no flags)
)

MMDIT_CHECKPOINTS: dict[str, TransformerCheckpoint] = {c.name: c for c in (SD3_MEDIUM, SD35_MEDIUM)}


def mmdit_checkpoint(name: str) -> TransformerCheckpoint:
    """The MMDiT checkpoint called ``name`` (sd3-medium, sd35-medium); one clear error otherwise."""
    if name not in MMDIT_CHECKPOINTS:
        raise ConfigError(f"MMDiT model variant {name!r} is unknown — use one of {', '.join(MMDIT_CHECKPOINTS)}")
    return MMDIT_CHECKPOINTS[name]


# ---- tiny variants ------------------------------------------------------------------------------------

TINY_T5_LAYERS = 2  # the tiny T5's depth (see tiny_mmdit)

def tiny_mmdit(ckpt: TransformerCheckpoint, divisor: int = 8) -> TransformerCheckpoint:
    """``ckpt`` with every width divided by ``divisor`` and everything else as published.

    Head counts are kept (head widths 64 → 8 at the default, so the joint width is 24 x 8 = 192 =
    caption_projection_dim / 8); the full depth is kept (24 joint blocks, 12 / 32 CLIP layers) except T5's:
    its 24 layers become ``TINY_T5_LAYERS`` (2). T5 is only the text encoder, and at full depth its 24 layers
    over the pipeline's 256 tokens were nearly all of a tiny run's time (3.5 s of a 2-step 64 px run on one
    CPU thread; 73 M of the ~132 M parameters, 277 MB on disk); every structural feature of a T5 layer
    (gated GELU, relative position buckets, RMS layer norm) is kept. ``joint_attention_dim``
    follows the tiny T5's ``d_model`` and ``pooled_projection_dim`` the sum of the tiny CLIP projections.
    The T5 vocabulary is cut to the ``BYT5_VOCAB_SIZE`` ids of ``ByT5Tokenizer``, which replaces T5's
    SentencePiece tokenizer (its model file cannot be had offline).
    """
    if divisor < 1:
        raise ConfigError(f"tiny width divisor {divisor} must be >= 1 — use e.g. 8")
    clips = []
    for i, cfg in enumerate(ckpt.text_encoders[:2]):
        clips.append({**cfg, **{k: _div(cfg[k], divisor, f"text_encoders[{i}].{k}")
                                for k in ("hidden_size", "intermediate_size", "projection_dim")}})
    t5 = {**ckpt.text_encoders[2], **{k: _div(ckpt.text_encoders[2][k], divisor, f"text_encoders[2].{k}")
                                      for k in ("d_model", "d_ff", "d_kv")}, "vocab_size": BYT5_VOCAB_SIZE,
          "num_layers": TINY_T5_LAYERS, "num_decoder_layers": TINY_T5_LAYERS}
    transformer = copy.deepcopy(ckpt.transformer)
    transformer["attention_head_dim"] = _div(transformer["attention_head_dim"], divisor, "transformer.attention_head_dim")
    transformer["caption_projection_dim"] = _div(transformer["caption_projection_dim"], divisor,
                                                 "transformer.caption_projection_dim")
    if transformer["caption_projection_dim"] != transformer["attention_head_dim"] * transformer["num_attention_heads"]:
        raise ConfigError(f"tiny transformer width {transformer['caption_projection_dim']} is not heads x head width "
                          f"— use a divisor that divides 64, e.g. 8")
    transformer["joint_attention_dim"] = t5["d_model"]
    transformer["pooled_projection_dim"] = sum(c["projection_dim"] for c in clips)
    if t5["d_model"] < sum(c["hidden_size"] for c in clips):  # the pipeline zero-pads the CLIP states to T5's width
        raise ConfigError(f"tiny T5 width {t5['d_model']} is below the CLIP states' {sum(c['hidden_size'] for c in clips)}"
                          f" — use the default divisor 8")
    vae = copy.deepcopy(ckpt.vae)
    vae["block_out_channels"] = [_div(c, divisor, "vae.block_out_channels") for c in vae["block_out_channels"]]
    vae["norm_num_groups"] = _div(vae["norm_num_groups"], divisor, "vae.norm_num_groups")
    tokenizers = (*ckpt.tokenizers[:2], {**ckpt.tokenizers[2], "_class_name": "ByT5Tokenizer"})
    return replace(ckpt, name=f"tiny-{ckpt.name}", transformer=transformer, vae=vae,
                   text_encoders=(clips[0], clips[1], t5), tokenizers=tokenizers)
