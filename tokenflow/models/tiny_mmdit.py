"""Tiny, offline, deterministic versions of Stable Diffusion 3 Medium and 3.5 Medium, for CPU tests.

A tiny MMDiT variant (:mod:`tokenflow.models.variants_mmdit`) is the published configuration with
every width divided by 8 (head widths 64 → 8) and everything else as published: 24 joint blocks,
patch 2, 16 latent channels, SD3.5's dual-attention blocks and QK RMS-norm, the positional table,
the flow-matching scheduler's shift, the VAE's scaling and shift factors, three text encoders.
Weights are random, drawn from the seed. Two adjustments make the random model usable: the
transformer's ``proj_out`` is damped so Euler ODE inversion round-trips, and the VAE encoder's mean
is rescaled so normalised latents of smooth images have unit variance (as real latents do). CLIP
tokenizers are the real CLIP BPE; the T5 slot is read by ``ByT5Tokenizer`` (no vocabulary file).
The pipeline is saved in diffusers' folder layout and loads through
``StableDiffusion3Pipeline.from_pretrained``. A build takes a few seconds and ~370 MB (SD3.5) / ~280 MB
(SD3) of float32, mostly the transformer, whose persistent sin-cos positional table (384² or 192² positions
x 192) is stored with it; the T5 is 2 layers deep (see :func:`~tokenflow.models.variants_mmdit.tiny_mmdit`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tokenflow.digests import json_digest
from tokenflow.errors import ConfigError
from tokenflow.models.tiny import (_numbered, _save_scheduler, _save_tokenizer, build_once, damped, latent_rescale,
                                   save_components)
from tokenflow.rng import seeded_init
from tokenflow.models.variants_mmdit import TEXT_ENCODER_CLASSES, TransformerCheckpoint, mmdit_checkpoint, tiny_mmdit

TINY_MMDIT_FORMAT_VERSION = 2  # 2: the T5 encoder is 2 layers deep
DEFAULT_TINY_MMDIT_VARIANT = "sd35-medium"


@dataclass(frozen=True)
class TinyMMDiTSpec:
    """Which MMDiT checkpoint, how small, and the seed of the tiny pipeline; every field enters its cache key."""

    seed: int = 0
    variant: str = DEFAULT_TINY_MMDIT_VARIANT  # sd35-medium | sd3-medium
    width_divisor: int = 8
    # Scale of the transformer's ``proj_out``. Undamped, a random tiny MMDiT's velocity has std ~0.6 and a
    # 4-step Euler inversion + sampling misses the latents by 12 % (rms); at 0.1 the velocity is ~0.06 and the
    # miss 0.4 % (tests/test_tiny_mmdit.py states the bound). 0.1 is also the tiny SD UNets' damping.
    output_damping: float = 0.1

    def __post_init__(self) -> None:
        mmdit_checkpoint(self.variant)  # one clear error for an unknown variant
        if not self.output_damping > 0:
            raise ConfigError(f"output_damping={self.output_damping} must be > 0 — use e.g. 0.1")

    def key(self) -> str:
        return json_digest({**asdict(self), "format": TINY_MMDIT_FORMAT_VERSION}, 16)


def build_tiny_mmdit_pipeline(folder: Path, spec: TinyMMDiTSpec = TinyMMDiTSpec()) -> None:
    """Build the tiny variant ``spec.variant`` from ``spec`` and save it in diffusers' layout under ``folder``."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    folder = Path(folder)
    ckpt = tiny_mmdit(mmdit_checkpoint(spec.variant), spec.width_divisor)
    with seeded_init(spec.seed):
        transformer = damped(SD3Transformer2DModel(**ckpt.transformer), "proj_out", spec.output_damping)
        vae = AutoencoderKL(**ckpt.vae)
        text_encoders = _text_encoders(ckpt)
        _calibrate_latents(vae, spec.seed)
    save_components(folder, {"transformer": transformer, "vae": vae, **text_encoders})
    for i, options in enumerate(ckpt.tokenizers[:2]):
        _save_tokenizer(folder / _numbered("tokenizer", i), options["model_max_length"], options["pad_token"])
    _save_byt5_tokenizer(folder / "tokenizer_3", ckpt.tokenizers[2]["model_max_length"])
    _save_scheduler(folder / "scheduler", ckpt.scheduler)
    (folder / "model_index.json").write_text(json.dumps(_model_index(ckpt), indent=2))
    (folder / "tiny_spec.json").write_text(json.dumps({**asdict(spec), "format": TINY_MMDIT_FORMAT_VERSION}, indent=2))


def _text_encoders(ckpt: TransformerCheckpoint) -> dict[str, torch.nn.Module]:
    """CLIP-L and CLIP-G with their projections (pooled outputs), and the T5 encoder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_l, clip_g, t5 = ckpt.text_encoders
    return {"text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**clip_l)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)),
            "text_encoder_3": T5EncoderModel(T5Config(**t5))}


def _save_byt5_tokenizer(folder: Path, model_max_length: int) -> None:
    """``ByT5Tokenizer`` (bytes, no vocabulary file) in T5's slot; the pipeline pads it to ``max_sequence_length``."""
    from transformers import ByT5Tokenizer

    ByT5Tokenizer(model_max_length=model_max_length).save_pretrained(folder)


def _model_index(ckpt: TransformerCheckpoint) -> dict:
    """model_index.json: the pipeline class, its flags, and every component's library and class (the optional
    IP-Adapter image encoder and feature extractor listed empty, as diffusers writes them)."""
    import diffusers

    index = {"_class_name": ckpt.index["_class_name"], "_diffusers_version": diffusers.__version__,
             **{k: v for k, v in ckpt.index.items() if k != "_class_name"},
             "scheduler": ["diffusers", ckpt.scheduler["_class_name"]],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    for i, (cls, tok) in enumerate(zip(TEXT_ENCODER_CLASSES, ckpt.tokenizers)):
        index[_numbered("text_encoder", i)] = ["transformers", cls]
        index[_numbered("tokenizer", i)] = ["transformers", tok["_class_name"]]
    return dict(sorted(index.items(), key=lambda kv: (not kv[0].startswith("_"), kv[0])))


@torch.no_grad()
def _calibrate_latents(vae: torch.nn.Module, seed: int) -> None:
    """Rescale the encoder's mean so ``(mean - shift_factor) * scaling_factor`` of smooth images has unit variance.

    This VAE has no ``quant_conv``: the mean rows of the encoder's ``conv_out`` are scaled by s and the
    decoder's ``conv_in`` weights by 1/s, so decoding the new latents gives what the random decoder gave
    before. The shift moves the mean only, so s = 1 / (std(mean) x scaling_factor). As in
    :func:`tokenflow.models.tiny._calibrate_latents`, the forward runs on one thread and s is rounded to 4
    significant digits, so every machine writes the same bytes.
    """
    s = latent_rescale(vae, seed)
    c = int(vae.config.latent_channels)
    vae.encoder.conv_out.weight[:c].mul_(s)
    vae.encoder.conv_out.bias[:c].mul_(s)
    vae.decoder.conv_in.weight.div_(s)


def tiny_mmdit_folder(cache_dir: str | os.PathLike, spec: TinyMMDiTSpec = TinyMMDiTSpec()) -> Path:
    """Return the folder of the tiny MMDiT pipeline for ``spec``, building it once (atomically) if absent."""
    target = Path(cache_dir).expanduser() / "models" / f"tiny-mmdit-{spec.key()}"
    return build_once(target, "model_index.json", lambda folder: build_tiny_mmdit_pipeline(folder, spec))
