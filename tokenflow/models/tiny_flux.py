"""Tiny, offline, deterministic versions of FLUX.1-dev and FLUX.1-schnell, for CPU tests.

A tiny FLUX variant (:func:`tokenflow.models.variants_flux.tiny_flux`) is the published configuration
with small widths and everything structural as published: double-stream then single-stream blocks in
the published 1:2 ratio, RoPE axes in the published 16:56:56 proportion summing to the head width,
patch 1 on the pipeline's 2x2-packed 16-channel latents, dev's guidance embedder (schnell has none),
each scheduler's (dynamic) shift, the VAE's scaling and shift factors and its missing quant convs,
CLIP-L's pooled output and the T5 encoder. What changes: 6 heads x 32 (not 24 x 128) and 6 + 12 blocks
(not 19 + 38: at full depth a forward took 3x as long, see ``tiny_flux``); text encoders and VAE at
widths / 8, T5 2 layers deep with the ByT5 vocabulary (as the tiny SD 3's). Weights are random, drawn
from the seed. Two adjustments make the random model usable, as for the tiny SD 3: the transformer's
``proj_out`` is damped so Euler ODE inversion round-trips, and the VAE encoder's mean is rescaled so
normalised latents of smooth images have unit variance (as real latents do). The CLIP tokenizer is the
real CLIP BPE; the T5 slot is read by ``ByT5Tokenizer`` (no vocabulary file). The pipeline is saved in
diffusers' folder layout and loads through ``FluxPipeline.from_pretrained``. A build takes a few seconds
and ~116 MB of float32 (transformer 58 MB, CLIP 24 MB, T5 24 MB, VAE 5 MB; the CLIP
tokenizer's vocabulary 5 MB).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenflow.digests import json_digest
from tokenflow.errors import ConfigError
from tokenflow.models.tiny import _save_scheduler, _save_tokenizer, build_once, damped, save_components
from tokenflow.models.tiny_mmdit import _calibrate_latents, _save_byt5_tokenizer
from tokenflow.rng import seeded_init
from tokenflow.models.variants_flux import FLUX_TEXT_ENCODER_CLASSES, FluxCheckpoint, flux_checkpoint, tiny_flux

TINY_FLUX_FORMAT_VERSION = 1
DEFAULT_TINY_FLUX_VARIANT = "flux-dev"


@dataclass(frozen=True)
class TinyFluxSpec:
    """Which FLUX.1 checkpoint and the seed of the tiny pipeline; every field enters its cache key."""

    seed: int = 0
    variant: str = DEFAULT_TINY_FLUX_VARIANT  # flux-dev | flux-schnell
    # Scale of the transformer's ``proj_out`` (the velocity), as the tiny SD 3's: a random transformer's velocity
    # is large and Euler inversion then misses; tests/test_tiny_flux.py states the damped velocity's scale.
    output_damping: float = 0.1

    def __post_init__(self) -> None:
        flux_checkpoint(self.variant)  # one clear error for an unknown variant
        if not self.output_damping > 0:
            raise ConfigError(f"output_damping={self.output_damping} must be > 0 — use e.g. 0.1")

    def key(self) -> str:
        return json_digest({**asdict(self), "format": TINY_FLUX_FORMAT_VERSION}, 16)


def build_tiny_flux_pipeline(folder: Path, spec: TinyFluxSpec = TinyFluxSpec()) -> None:
    """Build the tiny variant ``spec.variant`` from ``spec`` and save it in diffusers' layout under ``folder``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(folder)
    ckpt = tiny_flux(flux_checkpoint(spec.variant))
    clip, t5 = ckpt.text_encoders
    with seeded_init(spec.seed):
        transformer = damped(FluxTransformer2DModel(**ckpt.transformer), "proj_out", spec.output_damping)
        vae = AutoencoderKL(**ckpt.vae)
        # CLIP-L without a projection: FluxPipeline reads its pooler_output
        text_encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**clip)),
                         "text_encoder_2": T5EncoderModel(T5Config(**t5))}
        _calibrate_latents(vae, spec.seed)
    save_components(folder, {"transformer": transformer, "vae": vae, **text_encoders})
    clip_tokenizer, t5_tokenizer = ckpt.tokenizers
    _save_tokenizer(folder / "tokenizer", clip_tokenizer["model_max_length"], clip_tokenizer["pad_token"])
    _save_byt5_tokenizer(folder / "tokenizer_2", t5_tokenizer["model_max_length"])
    _save_scheduler(folder / "scheduler", ckpt.scheduler)
    (folder / "model_index.json").write_text(json.dumps(_flux_model_index(ckpt), indent=2))
    (folder / "tiny_spec.json").write_text(json.dumps({**asdict(spec), "format": TINY_FLUX_FORMAT_VERSION}, indent=2))


def _flux_model_index(ckpt: FluxCheckpoint) -> dict:
    """model_index.json of a FluxPipeline folder: its class, then every component's library and class (the
    optional IP-Adapter image encoder and feature extractor listed empty, as diffusers writes them)."""
    import diffusers

    (clip_cls, t5_cls), (clip_tok, t5_tok) = FLUX_TEXT_ENCODER_CLASSES, ckpt.tokenizers
    return {"_class_name": ckpt.index["_class_name"], "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "image_encoder": [None, None],
            "scheduler": ["diffusers", ckpt.scheduler["_class_name"]],
            "text_encoder": ["transformers", clip_cls], "text_encoder_2": ["transformers", t5_cls],
            "tokenizer": ["transformers", clip_tok["_class_name"]],
            "tokenizer_2": ["transformers", t5_tok["_class_name"]],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def tiny_flux_folder(cache_dir: str | os.PathLike, spec: TinyFluxSpec = TinyFluxSpec()) -> Path:
    """Return the folder of the tiny FLUX pipeline for ``spec``, building it once (atomically) if absent."""
    target = Path(cache_dir).expanduser() / "models" / f"tiny-flux-{spec.key()}"
    return build_once(target, "model_index.json", lambda folder: build_tiny_flux_pipeline(folder, spec))
