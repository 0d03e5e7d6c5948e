"""Image-UNet (or, with ``--backbone sd35`` / ``flux``, transformer) evaluations per editor and propagator, measured.

Each editor x propagator edits the same clip on the tiny model (the counts depend only on the schedule,
not on widths or weights) at two step counts; the counts are checked to be exactly linear in the steps
and extrapolated to 50 steps and the 16-frame clip the official figures are for. ControlNet evaluations
are counted apart (a ControlNet costs about half a UNet). Prints a Markdown table.

    python experiments/count_unet_evaluations.py --n-frames 16
    python experiments/count_unet_evaluations.py --n-frames 16 --backbone sd35   # sdedit, kv_injection, flowedit on SD 3.5
    python experiments/count_unet_evaluations.py --n-frames 16 --backbone flux   # the same on FLUX.1-dev

FlowEdit is inversion-free: its inversion column is 0 and it writes no trajectory.
"""
from __future__ import annotations

import argparse

import numpy as np


def count(model, editor_name: str, propagator_name: str, video, n_steps: int) -> tuple[int, int, int, int, int]:
    """(inversion UNet evaluations, edit UNet evaluations, ControlNet evaluations, editing steps run, editing
    steps the editor runs on a 50-step grid) of one edit."""
    from tokenflow import (DDIMInverter, FlowPropagator, NoPropagation, RandomKeyframes, TokenFlowPipeline,
                           TokenFlowPropagator, invert_video)
    from tokenflow.editors import (ControlNetEditor, FlowEditEditor, InstructPix2PixEditor, KVInjectionEditor,
                                   PnPEditor, PromptToPromptEditor, SDEditEditor)
    from tokenflow.models.trajectory import InversionResult
    from tokenflow.core.inversion import image_seq_len
    from tokenflow.core.video_inversion import encode_video

    editors = {
        "pnp": lambda: PnPEditor(),
        "sdedit": lambda: SDEditEditor(),
        "p2p": lambda: PromptToPromptEditor(),
        "controlnet": lambda: ControlNetEditor(controlnets={"canny": {"source": "tiny"}}),
        "ip2p": lambda: InstructPix2PixEditor(),
        "kv_injection": lambda: KVInjectionEditor(),
        "flowedit": lambda: FlowEditEditor(n_max=n_steps),  # every step edited: per-step counts are exact
    }
    propagators = {"tokenflow": TokenFlowPropagator, "flow": FlowPropagator, "none": NoPropagation}
    counter = {"unet": 0, "controlnet": 0}
    hook = model.denoiser.register_forward_pre_hook(  # the UNet takes latents positionally, the transformer by name
        lambda m, a, kw: counter.__setitem__("unet", counter["unet"] + (a[0] if a else kw["hidden_states"]).shape[0]),
        with_kwargs=True)
    try:
        editor = editors[editor_name]()
        inverter = DDIMInverter(n_steps=n_steps, keep_steps=n_steps)
        pipe = TokenFlowPipeline(model, editor, propagators[propagator_name](), RandomKeyframes(stride=8, seed=0),
                                 inverter, n_steps=n_steps, chunk_size=8)
        prompt = "a robotic wolf" if editor_name != "p2p" else "a fox"  # P2P word swap: equal token counts
        if editor.needs_inversion:
            inversion, _ = invert_video(model, video, inverter, "a wolf", None, progress=False)
        else:  # inversion-free: the encoded frames only, as TokenFlowPipeline.__call__ does
            inversion = InversionResult.clean_only(encode_video(model, video), "a wolf")
        inverted = counter["unet"]
        if editor_name == "controlnet":  # the ControlNet is loaded in prepare(): count it through a pre-hook then
            original = editor.prepare

            def prepare(inputs):
                original(inputs)
                for control in editor.controls:
                    control.net.register_forward_pre_hook(
                        lambda m, a, kw: counter.__setitem__("controlnet", counter["controlnet"] + a[0].shape[0]),
                        with_kwargs=True)
            editor.prepare = prepare
        result = pipe.edit(inversion, prompt=prompt, inversion_prompt="a wolf", progress=False, video=video)
        assert result.unet_evaluations == counter["unet"] - inverted
        scheduled = FlowEditEditor() if editor_name == "flowedit" else editor  # FlowEdit's published n_max: 33
        grid = pipe.sampler.grid(50, image_seq_len(model, tuple(inversion.clean.shape[-2:])))
        at_50 = len(scheduled.timesteps(grid.timesteps))  # SDEdit runs the last strength x 50
        return inverted, counter["unet"] - inverted, counter["controlnet"], len(result.timesteps), at_50
    finally:
        hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs=2, default=(2, 4), help="two step counts to measure at")
    parser.add_argument("--backbone", choices=("sd", "sd35", "flux"), default="sd",
                        help="sd: the tiny SD 2.1-base (every editor); sd35 / flux: the tiny SD 3.5 Medium / FLUX.1-dev "
                             "(sdedit, kv_injection, flowedit)")
    args = parser.parse_args()

    import torch

    from tokenflow import Video, load_model
    from tokenflow.models.tiny_extras import load_tiny_ip2p

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (1, args.size, args.size, 3), dtype=np.uint8), args.n_frames, 0)
    frames = np.stack([np.roll(f, 2 * i, axis=1) for i, f in enumerate(frames)])  # a translating clip
    video = Video(frames=frames, fps=10.0)
    transformer = args.backbone != "sd"
    variant = {"sd": "sd21-base", "sd35": "sd35-medium", "flux": "flux-dev"}[args.backbone]
    model = load_model("tiny", device="cpu", dtype="float32", tiny_variant=variant,
                       max_sequence_length=32 if transformer else None)  # T5 tokens do not change the counts
    ip2p = None if transformer else load_tiny_ip2p(device="cpu", dtype="float32")
    n, target = args.n_frames, 50
    print(f"| editor | propagator | inversion / frame / step | edit / frame / editing step | ControlNet / frame / "
          f"editing step | editing steps of {target} | total at {target} steps, {n} frames |")
    print("|---|---|---|---|---|---|---|")
    for editor in ("sdedit", "kv_injection", "flowedit") if transformer else ("pnp", "sdedit", "p2p", "controlnet", "ip2p"):
        for propagator in ("tokenflow", "flow", "none"):
            m = ip2p if editor == "ip2p" else model
            runs = [count(m, editor, propagator, video, s) for s in args.steps]
            inv = [r[0] / (n * s) for r, s in zip(runs, args.steps)]
            edit = [r[1] / (n * r[3]) for r in runs]
            control = [r[2] / (n * r[3]) for r in runs]
            constant = all(len(set(x)) == 1 for x in (inv, edit, control))  # exactly per frame and step
            edit_steps = runs[0][4]
            total = target * n * inv[0] + edit_steps * n * edit[0]
            note = "" if constant else " (per-step counts differ between the two step counts)"
            print(f"| {editor} | {propagator} | {inv[0]:g} | {edit[0]:g} | {control[0]:g} | {edit_steps} "
                  f"| {total:,.0f}{note} |", flush=True)

if __name__ == "__main__":
    main()
