"""A keyframe editor written in a few lines in research code runs through TokenFlow unchanged."""
from __future__ import annotations

from conftest import translation_clip
from tokenflow import (Branch, InversionCache, KeyframeEditor, NoPropagation, RandomKeyframes, TokenFlowPipeline,
                       TokenFlowPropagator)
from tokenflow.models.ddim import ddim_timesteps


class NegativeGuidance(KeyframeEditor):
    """CFG towards the prompt and away from a negative prompt (the README's example)."""

    def __init__(self, guidance_scale: float = 7.5):
        self.guidance_scale = guidance_scale
        self.seen_phases: set[str] = set()

    def prepare(self, inputs):
        self.uncond = inputs.model.encode_text(inputs.negative_prompt)
        self.cond = inputs.model.encode_text(inputs.prompt)

    def branches(self, step):
        self.seen_phases.add(step.phase)
        return [Branch("uncond", self.uncond), Branch("cond", self.cond)]

    def guide(self, eps, step):
        return eps["uncond"] + self.guidance_scale * (eps["cond"] - eps["uncond"])


def test_custom_editor_runs_through_tokenflow(tiny, tmp_path):
    """A user's editor (no PnP, no source reads) gets keyframe and propagate calls, the pipeline adds the source
    branch only for the propagator, and the per-frame baseline runs the same editor without it. Catches a pipeline
    that depends on editor internals, miscounted branches, a propagator that silently does nothing.
    """
    steps, n = 4, 5
    video = translation_clip(n=n, size=64, shift=8)
    cache = InversionCache(tmp_path)  # the baseline reuses the first run's inversion
    editor = NegativeGuidance(5.0)
    pipe = TokenFlowPipeline(tiny, editor, TokenFlowPropagator(), RandomKeyframes(2, seed=0), n_steps=steps,
                             chunk_size=4, cache=cache)
    result = pipe(video, prompt="a robotic wolf", negative_prompt="blurry", inversion_prompt="a wolf", progress=False)
    assert result.frames.shape == (n, 64, 64, 3) and result.frames.dtype.name == "uint8"
    assert editor.seen_phases == {"keyframes", "propagate"}
    # per step: keyframe pass (3 keyframes) + the 2 other frames, each x (source + uncond + cond)
    assert all(len(k) == 3 for k in result.keyframes)
    assert result.unet_evaluations == steps * 3 * n
    assert result.timesteps == ddim_timesteps(tiny.scheduler, steps)
    # the same editor per frame (no propagation, no source branch needed): 2 branches x 5 frames per step
    editor.seen_phases.clear()
    per_frame = TokenFlowPipeline(tiny, editor, NoPropagation(), n_steps=steps, chunk_size=n, cache=cache)
    baseline = per_frame(video, prompt="a robotic wolf", negative_prompt="blurry", inversion_prompt="a wolf",
                         progress=False)
    assert baseline.timings["inversion_cache_hit"] == 1.0
    assert editor.seen_phases == {"frames"}
    assert baseline.unet_evaluations == steps * 2 * n
    # joint keyframes and propagation change the result: measured relative L2 distance 0.0073
    gap = float((baseline.latents - result.latents).norm() / baseline.latents.norm())
    assert gap > 1e-3, gap
