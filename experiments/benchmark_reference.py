"""Cost of the official TokenFlow recipe (``experiment=reference_pnp``) vs the library's defaults.

Runs both on the same video and model, each in a fresh process (so peak memory is its own), and
prints per-stage time (inversion, reconstruction, editing), image-UNet evaluations and peak memory
side by side with the ratio reference/default. The reference's preprocessing always reconstructs the
video with 500 DDIM steps; the default edit reconstructs nothing (``tokenflow-invert`` does, on the
50-step grid, when asked).

    python experiments/benchmark_reference.py --model tiny --video ../shared/data/wolf.mp4 --n-frames 8 --size 128
    python experiments/benchmark_reference.py --model sd21 --n-frames 40 --size 512   # with a real checkpoint
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def _stage(counter: dict, fn):
    counter["evals"] = 0
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, counter["evals"]


def run_one(name: str, overrides: list[str], args: dict, queue) -> None:
    import torch
    from hydra import compose, initialize_config_module

    import tokenflow.cli.config  # noqa: F401
    from tokenflow import TokenFlowPipeline, invert_video, read_video
    from tokenflow.sizing import round_frames_down
    from tokenflow.instantiation import build
    from tokenflow.models.ddim import ddim_timesteps
    from tokenflow.core.inversion import sample

    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        cfg = compose(config_name="edit", overrides=[f"video={args['video']}", f"model={args['model']}",
                                                     f"n_frames={args['n_frames']}", *overrides])
    model = build(cfg.model)
    counter = {"evals": 0}
    model.unet.register_forward_pre_hook(lambda m, a, kw: counter.__setitem__("evals", counter["evals"] + a[0].shape[0]),
                                         with_kwargs=True)
    video = read_video(cfg.video, n_frames=cfg.n_frames, height=args["size"], width=args["size"])
    if cfg.round_frames_down:
        video = round_frames_down(video, cfg.keyframe_stride)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    inverter = build(cfg.inverter)
    pipe = TokenFlowPipeline(model, build(cfg.editor), build(cfg.propagator), build(cfg.keyframes), inverter,
                             n_steps=cfg.n_steps, chunk_size=cfg.chunk_size)
    prompt = model.encode_text(args["inversion_prompt"])
    (inversion, _), t_inv, e_inv = _stage(counter, lambda: invert_video(model, video, inverter, args["inversion_prompt"],
                                                                        None, progress=False))
    t_rec, e_rec = 0.0, 0
    if name == "reference":  # preprocess.py reconstructs from x_999 with the same 500 steps, always
        grid = ddim_timesteps(model.scheduler, cfg.inverter.n_steps)
        _, t_rec, e_rec = _stage(counter, lambda: sample(model, inversion.at(grid[0]), grid, prompt, progress=False))
    result, t_edit, e_edit = _stage(counter, lambda: pipe.edit(inversion, args["prompt"], cfg.negative_prompt,
                                                              progress=False))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if model.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put({"config": name, "frames": video.n_frames, "inversion_s": t_inv, "reconstruction_s": t_rec,
               "editing_s": t_edit, "total_s": t_inv + t_rec + t_edit, "unet_evals_inversion": e_inv,
               "unet_evals_reconstruction": e_rec, "unet_evals_editing": e_edit,
               "unet_evals_total": e_inv + e_rec + e_edit, "peak_memory_mb": peak,
               "memory_kind": "cuda max allocated" if model.device.type == "cuda" else "process max RSS",
               "device": str(model.device)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--video", default="../shared/data/wolf.mp4")
    ap.add_argument("--n-frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--prompt", default="a shiny silver robotic wolf")
    ap.add_argument("--inversion-prompt", default="a wolf")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = vars(ap.parse_args())
    configs = {"default": [], "reference": ["experiment=reference_pnp"]}
    ctx = mp.get_context("spawn")
    rows = {}
    for name, overrides in configs.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=run_one, args=(name, overrides, args, queue))
        proc.start()
        rows[name] = queue.get()
        proc.join()
    keys = ["frames", "inversion_s", "reconstruction_s", "editing_s", "total_s", "unet_evals_inversion",
            "unet_evals_reconstruction", "unet_evals_editing", "unet_evals_total", "peak_memory_mb"]
    print(f"\nmodel={args['model']} video={args['video']} size={args['size']} device={rows['default']['device']} "
          f"(peak memory: {rows['default']['memory_kind']})")
    print(f"{'':28s}{'default':>12s}{'reference':>12s}{'ref/default':>13s}")
    for k in keys:
        d, r = rows["default"][k], rows["reference"][k]
        ratio = f"{r / d:.2f}x" if d else "-"
        print(f"{k:28s}{d:12.1f}{r:12.1f}{ratio:>13s}")
    if args["json"]:
        with open(args["json"], "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
