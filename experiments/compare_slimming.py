"""AdaFlow's attention slimming against full extended attention at equal cost, on a clip where full attention fits.

40 frames of the wolf clip at keyframe stride 2 (20 keyframes per step), PnP + TokenFlow on the tiny model:
``attention=full`` (every keyframe reads all 20) against ``attention=auto`` with ``max_kv_frames`` below 20
(each keyframe reads its own tokens and the most similar others, ``max_kv_frames`` keyframes' worth). Prints
the latents' relative L2 difference and the warp error of each edit (flow estimated on the source). Same
inversion, keyframe draws and UNet evaluations for every row. A benchmark, not a test.

    python experiments/compare_slimming.py --video ../shared/data/wolf.mp4 --max-kv 10,5
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=None, help="default: the embedded sample clip")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--max-kv", default="10,5", help="max_kv_frames values to compare with full attention")
    args = parser.parse_args()

    from tokenflow import (DDIMInverter, KeyframeAttention, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator,
                           invert_video, load_model, read_video)
    from tokenflow.editors import PnPEditor
    from tokenflow.evaluation.metrics import warp_error
    from tokenflow.samples import sample_video_path

    torch.manual_seed(0)
    model = load_model("tiny", device="cpu", dtype="float32")
    video = read_video(args.video or sample_video_path(), n_frames=args.frames, height=args.size, width=args.size)
    inversion, _ = invert_video(model, video, DDIMInverter(n_steps=args.steps, keep_steps=args.steps), "a wolf",
                                progress=False)
    n_keyframes = len(range(0, video.n_frames, args.stride))
    rows = [("full", KeyframeAttention("all"))] + [(f"auto, max_kv_frames={m}", KeyframeAttention("auto", max_kv_frames=int(m)))
                                                   for m in args.max_kv.split(",")]
    print(f"{video.n_frames} frames at {args.size}x{args.size}, {n_keyframes} keyframes per step, {args.steps} steps, "
          "PnP + TokenFlow, tiny model")
    print("| attention | latent rel. L2 vs full | warp error | UNet evaluations | s |")
    print("|---|---|---|---|---|")
    reference = None
    for name, attention in rows:
        pipe = TokenFlowPipeline(model, PnPEditor(), TokenFlowPropagator(), RandomKeyframes(args.stride, seed=0),
                                 n_steps=args.steps, attention=attention)
        t0 = time.perf_counter()
        result = pipe.edit(inversion, "a robotic wolf", "", "a wolf", progress=False)
        seconds = time.perf_counter() - t0
        reference = result.latents if reference is None else reference
        diff = ((result.latents - reference).norm() / reference.norm()).item()
        warp = warp_error(result.frames, video.frames)["warp_error"]
        print(f"| {name} | {diff:.4f} | {warp:.5f} | {result.unet_evaluations:,} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
