"""Temporal consistency of TokenFlow, optical-flow propagation (``FlowPropagator``) and the per-frame baseline
(``NoPropagation``): warp error.

Warp error uses OpenCV optical flow on the *input* video, occlusions masked by a forward-backward
check (see ``tokenflow.evaluation.metrics.warp_error``); lower is more consistent. Numbers are not comparable
with RAFT-based figures in papers. ``FlowPropagator`` warps along OpenCV flow of the same input video, so
it is partly optimised for this very metric: its flow (``--propagation-flow``, DIS by default) differs from
the metric's (``--flow``, Farnebäck by default) to soften that, not remove it. Writes ``metrics.json`` into
``--out`` and prints a table. With the tiny model's random weights the figures only show the plumbing works.

    python experiments/compare_propagation.py --video ../shared/data/wolf.mp4 --model tiny
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from tokenflow.editors import PnPEditor
from tokenflow import (InversionCache, NoPropagation, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator,
                       load_model, read_video, write_video)
from tokenflow.core.flow_propagation import FlowPropagator
from tokenflow.evaluation.metrics import warp_error
from tokenflow.paths import default_cache_dir
from tokenflow.atomic import write_json


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
    ap.add_argument("--flow", default="farneback", choices=["farneback", "dis"], help="the warp metric's flow")
    ap.add_argument("--propagation-flow", default="dis", choices=["farneback", "dis"], help="FlowPropagator's flow")
    ap.add_argument("--out", default="outputs/compare_propagation")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    video = read_video(args.video, n_frames=args.n_frames, height=args.size, width=args.size)
    cache = InversionCache(default_cache_dir() / "inversions")
    rows = {"input (lower bound)": {**warp_error(video.frames, video.frames, args.flow)}}
    if args.propagation_flow == args.flow:
        print(f"note: FlowPropagator and the metric both use {args.flow} flow — the comparison favours FlowPropagator")
    propagators = {"tokenflow": TokenFlowPropagator(), f"flow ({args.propagation_flow})": FlowPropagator(method=args.propagation_flow),
                   "per-frame (NoPropagation)": NoPropagation()}
    for name, propagator in propagators.items():
        pipe = TokenFlowPipeline(model, PnPEditor(), propagator, RandomKeyframes(args.stride, args.seed),
                                 n_steps=args.steps, cache=cache)
        t0 = time.perf_counter()
        result = pipe(video, args.prompt, "ugly, blurry, low res", args.inversion_prompt)
        rows[name] = {**warp_error(result.frames, video.frames, args.flow), "seconds": time.perf_counter() - t0,
                      "unet_evaluations": result.unet_evaluations}
        write_video(out / f"{name.split()[0]}.mp4", result.frames, video.fps)
    baseline = rows["per-frame (NoPropagation)"]["warp_error"]
    ratios = {name: rows[name]["warp_error"] / baseline for name in propagators if not name.startswith("per-frame")}
    metrics = {"video": args.video, "model": model.identity, "n_frames": video.n_frames, "size": args.size,
               "steps": args.steps, "keyframe_stride": args.stride, "metric": rows["tokenflow"]["metric_name"],
               "propagation_flow": args.propagation_flow, "results": rows,
               "over_per_frame": ratios, "tokenflow_over_per_frame": ratios["tokenflow"]}
    write_json(out / "metrics.json", metrics)
    print(f"\n{metrics['metric']} on {Path(args.video).name}, {video.n_frames} frames at {args.size}px, "
          f"{args.steps} steps, model {model.identity}")
    for name, row in rows.items():
        extra = f"  {row['unet_evaluations']} UNet evaluations, {row['seconds']:.1f} s" if "seconds" in row else ""
        print(f"  {name:28s} {row['warp_error']:.5f}  (occluded {row['occluded_fraction']:.1%}){extra}")
    for name, ratio in ratios.items():
        print(f"  {name} / per-frame = {ratio:.3f}")
    print(f"  → {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
