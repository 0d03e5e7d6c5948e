"""The preflight's count of stored keyframe tokens is the count a real edit stores, on SD and on SDXL.

SDXL's blocks hold 2 and 10 transformer blocks each (``transformer_layers_per_block``), so counting one
self-attention layer per attention block undercounts its stored tokens five-fold; the estimate reads the
layers from :class:`~tokenflow.models.layout.UNetLayout` instead, and this test counts what the
TokenFlow processors really keep during a tiny edit.
"""
from __future__ import annotations

import pytest
import torch

from tokenflow import RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator, load_model
from tokenflow.core.attention import TokenFlowRuntime
from tokenflow.core.memory import ModelShape
from tokenflow.editors import PnPEditor
from tokenflow.storage.video import Video

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("variant, size", [("sd21-base", 64), ("sdxl", 64)])
def test_stored_keyframe_tokens_equal_the_estimate(variant, size, cache_dir, monkeypatch):
    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant=variant)
    stored: list[tuple[int, int]] = []  # (elements per keyframe and branch, layers) at the end of each step
    real_clear = TokenFlowRuntime.clear_step

    def record(runtime):
        if runtime.keyframe_tokens:
            per = {t.outputs[0, 0].numel() for t in runtime.keyframe_tokens.values()}
            total = sum(t.outputs[0, 0].numel() for t in runtime.keyframe_tokens.values())
            assert len({t.outputs.shape[:2] for t in runtime.keyframe_tokens.values()}) == 1 and per
            stored.append((total, len(runtime.keyframe_tokens)))
        real_clear(runtime)

    monkeypatch.setattr(TokenFlowRuntime, "clear_step", record)
    g = torch.Generator().manual_seed(0)
    video = Video.from_tensor(torch.rand(2, 3, size, size, generator=g) * 2 - 1, fps=10.0, source="random")
    pipe = TokenFlowPipeline(model, PnPEditor(), TokenFlowPropagator(stride=2), RandomKeyframes(2, seed=0), n_steps=2,
                             chunk_size=2)
    pipe(video, "a fox", inversion_prompt="a wolf", progress=False)
    shape = ModelShape.from_model(model)
    latent = size // model.vae_scale_factor
    assert stored, "no keyframe tokens were stored: the test does not test"
    total, layers = stored[0]
    assert layers == len(shape.self_attention_levels) == len(pipe.layout.self_attention)
    assert total == shape.self_attention_tokens(latent, latent)


# (tiny variant, editor, editor settings, propagator) -> the branches an editing step runs per frame
BRANCH_CASES = [
    ("sd21-base", "pnp", {}, "tokenflow"),            # source, uncond, cond
    ("sd21-base", "sdedit", {}, "none"),              # uncond, cond
    ("sd21-base", "sdedit", {}, "tokenflow"),         # + the source branch TokenFlow reads
    ("sd21-base", "sdedit", {"guidance_scale": 1.0}, "none"),  # guidance 1: cond only
    ("sd21-base", "p2p", {"guidance_scale": 1.0}, "none"),     # its own source branch + target
    ("flux-dev", "sdedit", {}, "tokenflow"),          # guidance-distilled: source, cond
    ("flux-dev", "kv_injection", {}, "none"),         # source, target
    ("flux-dev", "flowedit", {"n_max": 2}, "tokenflow"),  # source and target velocities; no extra source branch
    ("sd35-medium", "flowedit", {"n_max": 2, "n_avg": 2}, "none"),  # 2 draws x (source, target) x CFG
]


@pytest.mark.parametrize("variant, editor_name, settings, propagator_name", BRANCH_CASES)
def test_the_estimate_counts_the_branches_an_edit_runs(variant, editor_name, settings, propagator_name, cache_dir):
    """The preflight's branches per frame (what the keyframe tokens and the model's batch scale with) equal the
    model evaluations per frame and editing step a real edit counts, on SD, SD 3.5 and FLUX.1 (guidance-
    distilled: no unconditional branch) and for FlowEdit, which runs its own source velocity."""
    from tokenflow import NoPropagation
    from tokenflow.cli.preflight import branches_per_frame
    from tokenflow.editors import FlowEditEditor, KVInjectionEditor, PromptToPromptEditor, SDEditEditor

    transformer = variant != "sd21-base"
    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant=variant,
                       max_sequence_length=16 if transformer else None)
    editors = {"pnp": PnPEditor, "sdedit": SDEditEditor, "p2p": PromptToPromptEditor, "kv_injection": KVInjectionEditor,
               "flowedit": FlowEditEditor}
    editor = editors[editor_name](**settings)
    propagator = TokenFlowPropagator(stride=2) if propagator_name == "tokenflow" else NoPropagation()
    g = torch.Generator().manual_seed(0)
    video = Video.from_tensor(torch.rand(4, 3, 64, 64, generator=g) * 2 - 1, fps=10.0, source="random")
    pipe = TokenFlowPipeline(model, editor, propagator, RandomKeyframes(2, seed=0), n_steps=2, chunk_size=4)
    prompt = "a fox" if editor_name == "p2p" else "a robotic wolf"  # P2P swaps words: equal token counts
    result = pipe(video, prompt, inversion_prompt="a wolf", progress=False)
    measured = result.unet_evaluations / (len(video.frames) * len(result.timesteps))
    assert measured == branches_per_frame(model, editor, propagator)


def test_an_adaptive_cut_with_more_keyframes_than_assumed_is_checked_again(tiny, monkeypatch):
    """The preflight assumes one adaptive clip per 8 frames; a cut into more clips re-runs the memory check with the
    real count (and refuses if it no longer fits), a cut into fewer keeps the accepted shape."""
    from tokenflow.cli import preflight
    from tokenflow.core.attention import KeyframeAttention
    from tokenflow.core.memory import RunShape
    from tokenflow.errors import ConfigError

    shape = RunShape(n_frames=400, height=512, width=512, n_timesteps=50, keyframes=50)
    assert preflight.recheck_keyframes(tiny, shape, [[0, 9]] * 3) is shape
    seen = []
    monkeypatch.setattr(preflight, "check_run_memory", lambda model, s, what="": seen.append((s, what)))
    again = preflight.recheck_keyframes(tiny, shape, [list(range(0, 400, 2))] * 2, KeyframeAttention(), "400 frames")
    assert again.keyframes == again.held_keyframes == 200 and seen == [(again, "400 frames, 200 keyframes per step")]
    bounded = preflight.recheck_keyframes(tiny, shape, [list(range(0, 400, 2))], KeyframeAttention(context="anchors"))
    assert (bounded.keyframes, bounded.held_keyframes, bounded.anchors) == (4, 9, 4)
    monkeypatch.undo()
    monkeypatch.setattr(preflight, "free_host_memory", lambda: 2**30)  # 1 GiB free: 200 keyframes at 512² cannot fit
    with pytest.raises(ConfigError, match="200 keyframes per step"):
        preflight.recheck_keyframes(tiny, shape, [list(range(0, 400, 2))], KeyframeAttention(), "400 frames")
