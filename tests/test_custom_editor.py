"""A keyframe editor written in a few lines in research code runs through TokenFlow unchanged."""
from __future__ import annotations

import torch

from conftest import needs_data
from tokenflow import Branch, KeyframeEditor, NoPropagation, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator
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


@needs_data
def test_custom_editor_runs_through_tokenflow(tiny, wolf8):
    steps = 4
    editor = NegativeGuidance(5.0)
    pipe = TokenFlowPipeline(tiny, editor, TokenFlowPropagator(), RandomKeyframes(4, seed=0), n_steps=steps, chunk_size=4)
    result = pipe(wolf8, prompt="a robotic wolf", negative_prompt="blurry", inversion_prompt="a wolf", progress=False)
    assert result.frames.shape == (8, 128, 128, 3) and result.frames.dtype.name == "uint8"
    assert editor.seen_phases == {"keyframes", "propagate"}
    # per step: keyframe pass (2 keyframes) + the 6 other frames, each x (source + uncond + cond)
    assert result.unet_evaluations == steps * 3 * 8
    assert result.timesteps == ddim_timesteps(tiny.scheduler, steps)
    # the same editor per frame (no propagation, no source branch needed): 2 branches x 8 frames per step
    per_frame = TokenFlowPipeline(tiny, editor, NoPropagation(), n_steps=steps, chunk_size=4)
    baseline = per_frame(wolf8, prompt="a robotic wolf", negative_prompt="blurry", inversion_prompt="a wolf", progress=False)
    assert baseline.unet_evaluations == steps * 2 * 8
    assert not torch.equal(baseline.latents, result.latents)
