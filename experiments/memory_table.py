"""Estimated peak memory (tokenflow/core/memory.py) of edits against video length: SD 2.1 at 512x512,
SD 3.5 Medium or FLUX.1-dev at 1024x1024.

The model's shapes come from the published configs (tokenflow/models/variants*.py); the weights' size from
the denoiser, VAE and text encoders built on the meta device (no memory, no download). Runs are TokenFlow
on CUDA, 50 steps, keyframe_stride 8, chunk_size 8: the paper (every keyframe attends to all N/8
keyframes, ``paper``), the default (the same up to 20 keyframes; above, adaptive keyframes: ``--clips`` of them,
a count that depends on the video) and ``long_video`` (attention=anchors: 4 anchors, segments of 4 keyframes;
decoded frames streamed to the writers). The editor sets the branches per frame (``KeyframeEditor.branch_count``): PnP on
SD 2.1 and K/V injection on SD 3.5 run 3 (source, uncond, cond); on FLUX.1-dev, guidance-distilled,
SDEdit / K/V injection / FlowEdit with TokenFlow run 2. Prints a table (GiB; device = the GPU's total with
the weights, host = the run's addition to the process). A benchmark, not a test.

    python experiments/memory_table.py --frames 40,120,400,1000 --dtype float16
    python experiments/memory_table.py --backbone flux --frames 40,120,400 --dtype bfloat16 --vae-batch 1
"""
from __future__ import annotations

import argparse
import math

import torch

from tokenflow.core.memory import GIB, ModelShape, RunShape, TransformerShape, estimate_peak
from tokenflow.models.variants import SD21_BASE
from tokenflow.models.variants_flux import FLUX_DEV
from tokenflow.models.variants_mmdit import SD35_MEDIUM

ANCHORS, SEGMENT = 4, 4  # conf/attention/anchors.yaml
MAX_KEYFRAMES = 20  # conf/keyframes/auto.yaml: random keyframes up to this many, adaptive above


def weights_bytes(backbone: str, dtype: torch.dtype) -> int:
    """Parameters and buffers of the backbone's denoiser, VAE and text encoders in ``dtype`` (the VAE in
    float32 on SD 3.5 / FLUX: it is upcast), counted on the meta device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    with torch.device("meta"):
        if backbone == "sd21":
            parts = [UNet2DConditionModel.from_config(SD21_BASE.unet), CLIPTextModel(CLIPTextConfig(**SD21_BASE.text_encoders[0]))]
            vae = AutoencoderKL.from_config(SD21_BASE.vae)
        elif backbone == "sd35":
            clip_l, clip_g, t5 = SD35_MEDIUM.text_encoders
            parts = [SD3Transformer2DModel(**SD35_MEDIUM.transformer), CLIPTextModelWithProjection(CLIPTextConfig(**clip_l)),
                     CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)), T5EncoderModel(T5Config(**t5))]
            vae = AutoencoderKL(**SD35_MEDIUM.vae)
        else:
            clip_l, t5 = FLUX_DEV.text_encoders
            parts = [FluxTransformer2DModel(**FLUX_DEV.transformer), CLIPTextModel(CLIPTextConfig(**clip_l)),
                     T5EncoderModel(T5Config(**t5))]
            vae = AutoencoderKL(**FLUX_DEV.vae)
    size = torch.empty(0, dtype=dtype).element_size()
    count = lambda m: sum(t.numel() for t in list(m.parameters()) + list(m.buffers()))  # noqa: E731
    return sum(count(p) for p in parts) * size + count(vae) * (size if backbone == "sd21" else 4)


def model_shape(backbone: str, dtype: torch.dtype, weights: int) -> "ModelShape | TransformerShape":
    item = torch.empty(0, dtype=dtype).element_size()
    if backbone == "sd21":
        return ModelShape.from_configs(SD21_BASE.unet, SD21_BASE.vae, item, item, weights)
    if backbone == "sd35":  # 77 CLIP + 256 T5 tokens (the pipeline's max_sequence_length)
        return TransformerShape.from_configs(dict(SD35_MEDIUM.transformer), dict(SD35_MEDIUM.vae), item, 4, weights,
                                             text_tokens=77 + 256)
    return TransformerShape.from_configs(dict(FLUX_DEV.transformer), dict(FLUX_DEV.vae), item, 4, weights,
                                         text_tokens=512)  # T5 only, FluxPipeline's max_sequence_length


def run_shape(n: int, size: int, config: str, branches: int = 3, vae_batch: int = 8, clips: int = 20) -> RunShape:
    """The RunShape tokenflow/cli/preflight.run_shape gives for TokenFlow, stride 8, chunk 8, 50 steps: ``paper``
    (``keyframes=random attention=full``: K = N/8 keyframes in one call), ``default`` (the same up to 20
    keyframes; above, adaptive keyframes: ``clips`` of them, a data-dependent count given here) or
    ``long_video`` (anchors and segments)."""
    keyframes = math.ceil(n / 8)
    if config == "long_video":
        anchors = min(ANCHORS, keyframes)
        return RunShape(n, size, size, 50, branches=branches, keyframes=anchors, chunk_size=8, vae_batch=vae_batch,
                        cuda=True, held_keyframes=min(keyframes, SEGMENT + anchors + 1), anchors=anchors,
                        keep_frames=False)
    if config == "default" and keyframes > MAX_KEYFRAMES:
        keyframes = clips
    return RunShape(n, size, size, 50, branches=branches, keyframes=keyframes, chunk_size=8, vae_batch=vae_batch,
                    cuda=True, held_keyframes=keyframes)


NAMES = {"sd21": "SD 2.1 (sd21-base shapes)", "sd35": "SD 3.5 Medium", "flux": "FLUX.1-dev"}
BRANCHES = {"sd21": 3, "sd35": 3, "flux": 2}  # PnP / K/V injection: source, uncond, cond; FLUX: source, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=list(NAMES), default="sd21")
    parser.add_argument("--frames", default="40,120,400,1000")
    parser.add_argument("--size", type=int, default=None, help="pixels a side (default: 512 on sd21, 1024 otherwise)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--clips", type=int, default=20,
                        help="adaptive keyframes' clip count assumed for the default above 160 frames (data-dependent)")
    parser.add_argument("--configs", default="paper,default,long_video")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    size = args.size or (512 if args.backbone == "sd21" else 1024)
    weights = weights_bytes(args.backbone, dtype)
    model = model_shape(args.backbone, dtype, weights)
    print(f"{NAMES[args.backbone]} at {size}x{size} {args.dtype}, CUDA, 50 steps, TokenFlow with "
          f"{BRANCHES[args.backbone]} branches per frame, vae_batch {args.vae_batch}; weights {weights / GIB:.2f} GiB "
          "on the device")
    print(f"| frames | config | GPU peak (GiB) | phase | largest parts | host addition (GiB) | fits {args.budget_gib:g} GB |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.frames.split(",")):
        for name in args.configs.split(","):
            e = estimate_peak(model, run_shape(n, size, name, BRANCHES[args.backbone], args.vae_batch, args.clips))
            device = (weights + e.device_bytes) / GIB
            top = ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(e.parts.items(), key=lambda kv: -kv[1])[:2])
            print(f"| {n} | {name} | {device:.1f} | {e.phase} | {top} | {e.host_bytes / GIB:.2f} | "
                  f"{'yes' if device * GIB <= args.budget_gib * 1e9 else 'no'} |")


if __name__ == "__main__":
    main()
