"""Scale curve: time, UNet evaluations and peak memory of an edit against video length, side by side.

Each configuration runs as its own ``tokenflow-edit`` process on the tiny model (so peak RSS is that run's
alone) over the first n frames of a clip looped to the longest length (woman-running.mp4, 120 frames,
looped to 480), and the figures come from the run's metrics.json. Prints a table, writes
``scale.csv``, ``scale.json`` and ``scale.png`` into --out. A benchmark, not a test.

    python experiments/benchmark_scale.py --frames 8,24,48,120,480 --size 128 --steps 10
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

CONFIGS = {
    "default": [],
    "long (attention=anchors)": ["attention=anchors"],
    "reference": ["experiment=reference_pnp", "model=tiny", "round_frames_down=false", "n_frames=${n}",
                  "inverter.n_steps=${steps10}"],
}


def looped_clip(source: Path, n: int, size: int, folder: Path) -> Path:
    """``source``'s frames at size x size, looped to ``n`` frames, as an mp4 in ``folder``."""
    from tokenflow.storage.video import read_video, write_video
    import numpy as np

    clip = read_video(source, height=size, width=size)
    frames = np.concatenate([clip.frames] * (-(-n // clip.n_frames)))[:n]
    return write_video(folder / f"{source.stem}-{n}x{size}.mp4", frames, clip.fps)


def run(video: Path, n: int, size: int, steps: int, extra: list[str], out: Path, cache: Path) -> dict:
    overrides = ["model=tiny", f"video={video}", f"n_frames={n}", f"height={size}", f"width={size}",
                 f"n_steps={steps}", "progress=false", "metrics=none", f"hydra.run.dir={out}"]
    overrides += [o.replace("${n}", str(n)).replace("${steps10}", str(10 * steps)) for o in extra]
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).parent / "tokenflow-edit"
    start = time.perf_counter()
    proc = subprocess.run([str(exe), *overrides], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": "failed", "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics.get("metrics", metrics)
    return {"status": "ok", "wall_s": wall, "unet_evaluations": m.get("unet_evaluations"),
            "peak_rss_mb": m.get("peak_rss_mb"), "inversion_s": m.get("inversion_s"), "editing_s": m.get("editing_s")}


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    for ax, key, label in zip(fig.subplots(1, 3), ("wall_s", "unet_evaluations", "peak_rss_mb"),
                              ("time (s)", "UNet evaluations", "peak RSS (MB)")):
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
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="benchmark-scale")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(n) for n in args.frames.split(",")]
    names = [c for c in CONFIGS if c in args.configs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        video = looped_clip(Path(args.video), max(lengths), args.size, Path(tmp))
        for n in lengths:
            for name in names:
                row = {"config": name, "frames": n, **run(video, n, args.size, args.steps, CONFIGS[name],
                                                          Path(tmp) / f"run-{name[:4]}-{n}", cache)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    (out / "scale.json").write_text(json.dumps(rows, indent=2))
    with open(out / "scale.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "scale.png")
    print(f"\n| config | frames | time (s) | UNet evaluations | peak RSS (MB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['frames']} | {r['wall_s']:.1f} | {r.get('unet_evaluations', '–')} | "
              f"{r.get('peak_rss_mb', '–')} |" + ("" if r["status"] == "ok" else f" failed: {r['error']}"))


if __name__ == "__main__":
    main()
