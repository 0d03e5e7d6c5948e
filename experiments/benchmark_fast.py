"""End to end against the official schedule: UNet evaluations, seconds and quality, side by side in one run.

Four schedules edit the same clip on the same weights (PnP, "a robotic wolf"):

* official   — the official code's schedule: 500-step inversion, its mandatory 500-step reconstruction,
               50 edit steps with the official settings (experiment=reference_pnp), keyframes recomputed;
* reference  — experiment=reference_pnp: the same without the reconstruction;
* default    — this library's defaults: 50-step inversion on the editing grid, 50 edit steps, 3N per step;
* fast       — experiment=fast: 20 steps, fixed-point inversion (1 refinement per step).

Reported per schedule: image-UNet evaluations (counted with a forward hook), seconds, reconstruction PSNR
(the inversion sampled back on the edit's grid at guidance 1, against the VAE-only decode of the input),
and the edit's distance to the default 50-step edit (frame PSNR) and its warp error. Prints a Markdown
table and writes benchmark-fast.json. A benchmark, not a test.

    python experiments/benchmark_fast.py --model tiny --n-frames 16 --size 128
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SCHEDULES = ("official", "reference", "default", "fast")


class Counter:
    """Image-UNet evaluations (batch elements) through a forward pre-hook."""

    def __init__(self, unet) -> None:
        self.samples = 0
        self.handle = unet.register_forward_pre_hook(lambda module, args: self._add(args[0].shape[0]))

    def _add(self, n: int) -> None:
        self.samples += n


def schedule(name: str, model, args):
    """(inverter, pipeline, reconstruct_steps) of a schedule, built from the library's configs."""
    from tokenflow import DDIMInverter, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator
    from tokenflow.editors import PnPEditor

    n = args.steps
    if name in ("official", "reference"):  # conf/experiment/reference_pnp.yaml
        inverter = DDIMInverter(n_steps=10 * n, keep_steps=n, keep_final=True, batch_size=8)
        pipe = TokenFlowPipeline(model, PnPEditor(initial_latent="renoised"),
                                 TokenFlowPropagator(blend="reference", source_features="propagated", stride=8),
                                 RandomKeyframes(8, seed=1, formula="reference"), inverter, n_steps=n)
        return inverter, pipe, (10 * n if name == "official" else 0)
    fast = name == "fast"
    steps = args.fast_steps if fast else n
    inverter = DDIMInverter(n_steps=steps, keep_steps=steps, fixed_point=1 if fast else 0)
    pipe = TokenFlowPipeline(model, PnPEditor(), TokenFlowPropagator(), RandomKeyframes(8, seed=1), inverter,
                             n_steps=steps)
    return inverter, pipe, 0


def main() -> None:
    from tokenflow import invert_video, load_model, read_video
    from tokenflow.core.inversion import reconstruct, sample
    from tokenflow.evaluation.metrics import psnr, warp_error
    from tokenflow.models.ddim import ddim_timesteps
    from tokenflow.storage.video import frames_from_tensor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--video", default=str(Path(__file__).resolve().parents[2] / "shared/data/wolf.mp4"))
    parser.add_argument("--n-frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--fast-steps", type=int, default=20)
    parser.add_argument("--out", default="benchmark-fast.json")
    args = parser.parse_args()

    model = load_model(args.model)
    video = read_video(args.video, n_frames=args.n_frames, height=args.size, width=args.size)
    vae_only = frames_from_tensor(model.decode_latents(model.encode_images(video.to_tensor())))
    rows, edits = {}, {}
    for name in SCHEDULES:
        inverter, pipe, recon_steps = schedule(name, model, args)
        counter = Counter(model.unet)
        start = time.perf_counter()
        inversion, _ = invert_video(model, video, inverter, "a wolf", progress=False)
        if recon_steps:  # the official preprocess.py always reconstructs from x_999 with its 500 steps
            grid = ddim_timesteps(model.scheduler, recon_steps)
            sample(model, inversion.at(max(inversion.timesteps)), grid, model.encode_text("a wolf"), progress=False)
        result = pipe.edit(inversion, "a robotic wolf", "ugly, blurry", "a wolf", progress=False, video=video)
        seconds = time.perf_counter() - start
        counter.handle.remove()
        evaluations = counter.samples
        recon = frames_from_tensor(model.decode_latents(reconstruct(model, inversion, progress=False)))
        edits[name] = result.frames
        rows[name] = {"unet_evaluations": evaluations, "seconds": seconds,
                      "reconstruction_psnr_vs_vae_only": psnr(recon, vae_only),
                      "warp_error": warp_error(result.frames, video.frames)["warp_error"]}
        print(name, json.dumps(rows[name]), flush=True)
    for name in SCHEDULES:
        rows[name]["edit_psnr_vs_default"] = psnr(edits[name], edits["default"])
        rows[name]["cheaper_than_official"] = rows["official"]["unet_evaluations"] / rows[name]["unet_evaluations"]
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=float))
    print(f"\n{args.n_frames} frames at {args.size}px, model {model.identity}\n")
    print("| schedule | UNet evaluations | x cheaper than official | seconds | reconstruction PSNR (dB) | "
          "edit PSNR vs default (dB) | warp error |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['unet_evaluations']:,} | {r['cheaper_than_official']:.2f} | {r['seconds']:.1f} | "
              f"{r['reconstruction_psnr_vs_vae_only']:.2f} | {r['edit_psnr_vs_default']:.2f} | {r['warp_error']:.5f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
