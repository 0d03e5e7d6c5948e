"""Temporal consistency of TokenFlow vs the per-frame baseline (``NoPropagation``): warp error.

Warp error uses OpenCV optical flow on the *input* video, occlusions masked by a forward-backward
check (see ``tokenflow.evaluation.metrics.warp_error``); lower is more consistent. Numbers are not comparable
with RAFT-based figures in papers. Writes ``metrics.json`` into ``--out`` and prints a table.

    python experiments/compare_propagation.py --video ../shared/data/wolf.mp4 --model tiny
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenflow.editors import PnPEditor
from tokenflow import (InversionCache, NoPropagation, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator,
                       load_model, read_video, write_video)
from tokenflow.evaluation.metrics import warp_error
from tokenflow.paths import default_cache_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", default="../shared/data/wolf.mp4")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompt", default="a shiny silver robotic wolf")
    ap.add_argument("--inversion-prompt", default="a wolf")
    ap.add_argument("--n-frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--flow", default="farneback", choices=["farneback", "dis"])
    ap.add_argument("--out", default="outputs/compare_propagation")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    video = read_video(args.video, n_frames=args.n_frames, height=args.size, width=args.size)
    cache = InversionCache(default_cache_dir() / "inversions")
    rows = {"input (lower bound)": {**warp_error(video.frames, video.frames, args.flow)}}
    for name, propagator in {"tokenflow": TokenFlowPropagator(), "per-frame (NoPropagation)": NoPropagation()}.items():
        pipe = TokenFlowPipeline(model, PnPEditor(), propagator, RandomKeyframes(args.stride, args.seed),
                                 n_steps=args.steps, cache=cache)
        t0 = time.perf_counter()
        result = pipe(video, args.prompt, "ugly, blurry, low res", args.inversion_prompt)
        rows[name] = {**warp_error(result.frames, video.frames, args.flow), "seconds": time.perf_counter() - t0,
                      "unet_evaluations": result.unet_evaluations}
        write_video(out / f"{name.split()[0]}.mp4", result.frames, video.fps)
    ratio = rows["tokenflow"]["warp_error"] / rows["per-frame (NoPropagation)"]["warp_error"]
    metrics = {"video": args.video, "model": model.identity, "n_frames": video.n_frames, "size": args.size,
               "steps": args.steps, "keyframe_stride": args.stride, "metric": rows["tokenflow"]["metric_name"],
               "results": rows, "tokenflow_over_per_frame": ratio}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    print(f"\n{metrics['metric']} on {Path(args.video).name}, {video.n_frames} frames at {args.size}px, "
          f"{args.steps} steps, model {model.identity}")
    for name, row in rows.items():
        print(f"  {name:28s} {row['warp_error']:.5f}  (occluded {row['occluded_fraction']:.1%})")
    print(f"  tokenflow / per-frame = {ratio:.3f}   → {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
