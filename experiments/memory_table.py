"""Estimated peak memory (tokenflow/core/memory.py) of SD 2.1 edits at 512x512 against video length.

The model's shapes come from SD21_BASE's published configs (tokenflow/models/variants.py); the weights'
size from the UNet, VAE and text encoder built on the meta device (no memory, no download). Runs are
PnP + TokenFlow on CUDA, 50 steps, keyframe_stride 8, chunk_size 8, vae_batch 8: ``default`` (every
keyframe attends to all N/8 keyframes) against ``long_video`` (attention=anchors: 4 anchors, segments of
4 keyframes; decoded frames streamed to the writers). Prints a table (GiB; device = the GPU's total
with the weights, host = the run's addition to the process). A benchmark, not a test.

    python experiments/memory_table.py --frames 40,120,400,1000 --dtype float16
"""
from __future__ import annotations

import argparse
import math

import torch

from tokenflow.core.memory import GIB, ModelShape, RunShape, estimate_peak
from tokenflow.models.variants import SD21_BASE

ANCHORS, SEGMENT = 4, 4  # conf/attention/anchors.yaml


def weights_bytes(dtype: torch.dtype) -> int:
    """Parameters and buffers of SD 2.1's UNet, VAE and text encoder in ``dtype``, counted on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        parts = [UNet2DConditionModel.from_config(SD21_BASE.unet), AutoencoderKL.from_config(SD21_BASE.vae),
                 CLIPTextModel(CLIPTextConfig(**SD21_BASE.text_encoders[0]))]
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(t.numel() for part in parts for t in list(part.parameters()) + list(part.buffers())) * size


def run_shape(n: int, size: int, long_video: bool) -> RunShape:
    """The RunShape tokenflow/cli/preflight.run_shape gives for PnP + TokenFlow, stride 8, chunk 8, 50 steps."""
    keyframes = math.ceil(n / 8)
    if long_video:
        anchors = min(ANCHORS, keyframes)
        return RunShape(n, size, size, 50, branches=3, keyframes=anchors, chunk_size=8, cuda=True,
                        held_keyframes=min(keyframes, SEGMENT + anchors + 1), anchors=anchors, keep_frames=False)
    return RunShape(n, size, size, 50, branches=3, keyframes=keyframes, chunk_size=8, cuda=True,
                    held_keyframes=keyframes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="40,120,400,1000")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--budget-gib", type=float, default=24.0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    weights = weights_bytes(dtype)
    item = torch.empty(0, dtype=dtype).element_size()
    model = ModelShape.from_configs(SD21_BASE.unet, SD21_BASE.vae, item, item, weights)
    print(f"SD 2.1 (sd21-base shapes) at {args.size}x{args.size} {args.dtype}, CUDA, 50 steps, PnP + TokenFlow; "
          f"weights {weights / GIB:.2f} GiB on the device")
    print("| frames | config | GPU peak (GiB) | phase | largest parts | host addition (GiB) | fits 24 GB |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.frames.split(",")):
        for name in ("default", "long_video"):
            e = estimate_peak(model, run_shape(n, args.size, name == "long_video"))
            device = (weights + e.device_bytes) / GIB
            top = ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(e.parts.items(), key=lambda kv: -kv[1])[:2])
            print(f"| {n} | {name} | {device:.1f} | {e.phase} | {top} | {e.host_bytes / GIB:.2f} | "
                  f"{'yes' if device * GIB <= args.budget_gib * 1e9 else 'no'} |")


if __name__ == "__main__":
    main()
