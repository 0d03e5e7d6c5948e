"""What a sweep over prompts on one video costs, against the same edits run independently.

Four prompts edit the same clip (tiny model by default) three ways, each measured in one process
with a forward hook on the UNet (image-UNet evaluations) and a clock:

* independent  — four runs with no cache: each inverts the video and searches its correspondences;
* cached       — the inversion cache: the first run inverts, the other three read it;
* reused       — the inversion cache and ``reuse_correspondences``: the first run also records its
                 nearest-neighbour fields, the others read them (no search; an editor without a source
                 branch of its own, SDEdit here, then drops the source branch: 2 instead of 3 per call).

Every edit is checked against the independent run of the same prompt (max abs latent difference).
Prints a Markdown table. A benchmark, not a test.

    python experiments/benchmark_prompt_sweep.py --n-frames 16 --size 128 --steps 20
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

PROMPTS = ("a robotic wolf", "a wolf made of origami", "a marble statue of a wolf", "a wolf in a snowstorm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--video", default="sample", help="a clip, or 'sample' for the embedded one")
    parser.add_argument("--n-frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--editor", default="sdedit", choices=("sdedit", "pnp"))
    args = parser.parse_args()

    import torch

    from tokenflow import (DDIMInverter, InversionCache, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator,
                           load_model, read_video)
    from tokenflow.editors import PnPEditor, SDEditEditor
    from tokenflow.samples import is_sample, sample_video_path

    model = load_model(args.model)
    counter = {"n": 0}
    model.unet.register_forward_pre_hook(lambda m, a, kw: counter.__setitem__("n", counter["n"] + a[0].shape[0]),
                                         with_kwargs=True)
    path = sample_video_path() if is_sample(args.video) else args.video
    video = read_video(path, n_frames=args.n_frames, height=args.size, width=args.size)
    editor = (lambda: SDEditEditor()) if args.editor == "sdedit" else (lambda: PnPEditor())

    def sweep(work: Path, cache: bool, reuse: bool) -> tuple[list[torch.Tensor], int, float]:
        counter["n"], latents, t0 = 0, [], time.perf_counter()
        for prompt in PROMPTS:
            propagator = TokenFlowPropagator(reuse_correspondences=reuse, cache_dir=str(work))
            pipe = TokenFlowPipeline(model, editor(), propagator, RandomKeyframes(stride=8, seed=0),
                                     DDIMInverter(n_steps=args.steps, keep_steps=args.steps), n_steps=args.steps,
                                     cache=InversionCache(work / "inversions") if cache else None)
            latents.append(pipe(video, prompt=prompt, inversion_prompt="a wolf", progress=False).latents)
        return latents, counter["n"], time.perf_counter() - t0

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cache, reuse in (("independent", False, False), ("cached", True, False), ("reused", True, True)):
            rows[name] = sweep(Path(tmp) / name, cache, reuse)
    base_latents, base_evals, base_s = rows["independent"]
    print(f"{len(PROMPTS)} prompts, {args.editor}, {video.n_frames} frames at {args.size}x{args.size}, "
          f"{args.steps} steps, model={args.model}\n")
    print("| sweep | image-UNet evaluations | vs independent | seconds | vs independent | max abs latent diff |")
    print("|---|---|---|---|---|---|")
    for name, (latents, evals, seconds) in rows.items():
        diff = max(float((a - b).abs().max()) for a, b in zip(latents, base_latents))
        print(f"| {name} | {evals:,} | {evals / base_evals:.2f}x | {seconds:.1f} | {seconds / base_s:.2f}x | {diff:.2e} |")


if __name__ == "__main__":
    main()
