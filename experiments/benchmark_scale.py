"""Scale curve: time, UNet evaluations and peak memory of an edit against video length, side by side.

Each (configuration, length) runs in a fresh Python process (so its peak RSS is that run's alone, with
OMP_NUM_THREADS=1) on the tiny model, over the first n frames of a clip looped to the longest length
(woman-running.mp4, 120 frames, looped to 480). The worker composes the run's configuration from the
package's Hydra configs (``experiment=long_video`` etc.), inverts through the inversion cache (a fresh
folder per run, so every run inverts and the trajectory streams into the entry) and edits through the
Python API, as ``tokenflow-edit`` does; ``long_video`` writes edited.mp4 and frames/ as they are decoded
(``VideoWriter``/``FrameWriter``), the others gather the frames and write them at the end (the CLI today).
Prints a table, writes ``scale.csv``, ``scale.json`` and ``scale.png`` into --out. A benchmark, not a test.

    python experiments/benchmark_scale.py --frames 8,24,48,120,480 --size 128 --steps 5
    python experiments/benchmark_scale.py --frames 24,120,480,1000 --size 128 --steps 2 --configs default,nulltext
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name -> Hydra overrides of conf/edit.yaml (metrics are not part of the measurement)
    "default": ["metrics=none"],
    "long_video": ["experiment=long_video"],
    "reference": ["experiment=reference_pnp", "round_frames_down=false", "metrics=none"],
    "nulltext": ["inverter=nulltext", "negative_prompt=", "metrics=none"],
}


def looped_clip(source: Path, n: int, size: int, folder: Path) -> Path:
    """``source``'s frames at size x size, looped to ``n`` frames, as an mp4 in ``folder``."""
    import numpy as np

    from tokenflow.storage.mp4 import write_video
    from tokenflow.storage.video import read_video

    clip = read_video(source, height=size, width=size)
    frames = np.concatenate([clip.frames] * (-(-n // clip.n_frames)))[:n]
    return write_video(folder / f"{source.stem}-{n}x{size}.mp4", frames, clip.fps)


def worker(video: str, n: int, size: int, steps: int, inversion_steps: int | None, overrides: list[str],
           out: Path) -> dict:
    """One edit in this process; returns its figures (run in a fresh process by :func:`run`)."""
    import torch
    from hydra import compose, initialize_config_module

    import tokenflow.cli.config  # noqa: F401  registers the run schema
    from tokenflow.instantiation import build
    from tokenflow.core.memory import current_rss, peak_rss
    from tokenflow.core.pipeline import TokenFlowPipeline
    from tokenflow.models.loading import load_model
    from tokenflow.storage.cache import InversionCache
    from tokenflow.storage.mp4 import VideoWriter, write_video
    from tokenflow.storage.png import FrameWriter, write_frames
    from tokenflow.storage.video import read_video

    torch.manual_seed(0)
    args = [f"video={video}", "model=tiny", f"n_frames={n}", f"height={size}", f"width={size}", f"n_steps={steps}",
            *overrides]
    if inversion_steps:
        args.append(f"inverter.n_steps={inversion_steps}")
    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        cfg = compose(config_name="edit", overrides=args)
    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=os.environ.get("TOKENFLOW_CACHE"))
    parts = {name: build(cfg[name]) for name in ("inverter", "editor", "propagator", "keyframes", "attention")}
    clip = read_video(video, n_frames=n, height=size, width=size)
    pipe = TokenFlowPipeline(model, parts["editor"], parts["propagator"], parts["keyframes"], parts["inverter"],
                             n_steps=steps, chunk_size=cfg.chunk_size, cache=InversionCache(out / "cache"),
                             attention=parts["attention"])
    stream = "experiment=long_video" in overrides
    negative = "" if "inverter=nulltext" in overrides else "ugly"  # null-text embeddings are the unconditional branch
    before = current_rss()
    start = time.perf_counter()
    if stream:
        with VideoWriter(out / "edited.mp4", clip.fps) as mp4, FrameWriter(out / "frames") as pngs:
            result = pipe(clip, "a robot running", negative, "a woman running", progress=False, output=[mp4, pngs],
                          keep_frames=False)
    else:
        result = pipe(clip, "a robot running", negative, "a woman running", progress=False)
        write_video(out / "edited.mp4", result.frames, clip.fps)
        write_frames(out / "frames", result.frames)
    seconds = time.perf_counter() - start  # the pipeline call (long_video: with its streamed writes)
    return {"status": "ok", "run_s": seconds, "unet_evaluations": result.unet_evaluations,
            "inversion_s": result.timings["inversion_s"], "editing_s": result.timings["editing_s"],
            "peak_rss_mb": peak_rss() / 2**20, "rss_before_run_mb": before / 2**20}


def run(video: Path, n: int, size: int, steps: int, config: str, out: Path) -> dict:
    """:func:`worker` in a fresh process (OMP_NUM_THREADS=1); its figures, or the failure's last line."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"video": str(video), "n": n, "size": size, "steps": steps, "overrides": CONFIGS[config],
            "inversion_steps": 10 * steps if config == "reference" else None, "out": str(out)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": "failed", "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    for ax, key, label in zip(fig.subplots(1, 3), ("run_s", "unet_evaluations", "peak_rss_mb"),
                              ("pipeline call: invert + edit + decode (s)", "UNet evaluations", "peak RSS (MB)")):
        for config in dict.fromkeys(r["config"] for r in rows):
            pts = [(r["frames"], r[key]) for r in rows if r["config"] == config and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=config)
        ax.set_xscale("log")
        ax.set_xlabel("frames")
        ax.set_title(label)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=str(Path(__file__).resolve().parents[2] / "shared/data/woman-running.mp4"))
    parser.add_argument("--frames", default="8,24,48,120,480")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", default="default,long_video")
    parser.add_argument("--out", default="benchmark-scale")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        figures = worker(spec["video"], spec["n"], spec["size"], spec["steps"], spec["inversion_steps"],
                         spec["overrides"], Path(spec["out"]))
        print(json.dumps(figures))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(n) for n in args.frames.split(",")]
    names = [c for c in args.configs.split(",") if c in CONFIGS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        video = looped_clip(Path(args.video), max(lengths), args.size, Path(tmp))
        for n in lengths:
            for name in names:
                row = {"config": name, "frames": n, **run(video, n, args.size, args.steps, name, Path(tmp) / f"{name}-{n}")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    (out / "scale.json").write_text(json.dumps(rows, indent=2))
    with open(out / "scale.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "scale.png")
    print(f"\n{args.size}x{args.size}, {args.steps} steps, tiny model, one process per row (OMP_NUM_THREADS=1)")
    print("| config | frames | pipeline call (s) | process (s) | UNet evaluations | peak RSS (MB) |\n|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['config']} | {r['frames']} | – | {r['wall_s']:.1f} | – | – | failed: {r['error']}")
            continue
        print(f"| {r['config']} | {r['frames']} | {r['run_s']:.1f} | {r['wall_s']:.1f} | {r['unet_evaluations']} | "
              f"{r['peak_rss_mb']:.0f} |")
    for name in names:
        peak = {r["frames"]: r["peak_rss_mb"] for r in rows if r["config"] == name and r["status"] == "ok"}
        if 24 in peak and max(peak) > 24:
            print(f"{name}: peak RSS at {max(peak)} frames / at 24 frames = {peak[max(peak)] / peak[24]:.3f}")


if __name__ == "__main__":
    main()
