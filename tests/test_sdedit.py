"""SDEdit editor: start timestep (exact vs official slicing), re-noising, end-to-end cost with and without propagation."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import UNetCounter, translation_clip
from tokenflow.editors import SDEditEditor
from tokenflow import (DDIMInverter, FixedKeyframes, NoPropagation, TokenFlowPipeline, TokenFlowPropagator,
                       invert_video)
from tokenflow.models.ddim import ddim_timesteps
from tokenflow.core.editor import EditInputs
from tokenflow.errors import ConfigError

STEPS = 6


@pytest.fixture(scope="module")
def clip_inversion(tiny):
    video = translation_clip(n=4, size=64, shift=8)
    return invert_video(tiny, video, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a texture", progress=False)[0]


def _inputs(model, inversion, steps=STEPS):
    return EditInputs(model, inversion, "a red texture", "", inversion.prompt, ddim_timesteps(model.scheduler, steps))


@pytest.mark.parametrize("strength, slicing, n_run, first", [
    (1.0, "exact", 50, 981), (0.9, "exact", 45, 881), (0.5, "exact", 25, 481), (0.0, "exact", 0, None),
    (1.0, "reference", 49, 961),  # the official slice drops t=981
    (0.9, "reference", 44, 861), (0.5, "reference", 24, 461),
])
def test_start_timestep_hand_computed(tiny, strength, slicing, n_run, first):
    grid = ddim_timesteps(tiny.scheduler, 50)
    assert grid[0] == 981 and grid[-1] == 1
    steps = SDEditEditor(strength=strength, start_slicing=slicing).timesteps(grid)
    assert len(steps) == n_run and (steps[0] if steps else None) == first
    assert steps == grid[len(grid) - n_run:]
    if slicing == "reference":  # literally the official run_tokenflow_sdedit.py slice
        assert steps == grid[int(1 - strength * len(grid)):]


def test_strength_zero_returns_the_input_latents_exactly(tiny, clip_inversion):
    pipe = TokenFlowPipeline(tiny, SDEditEditor(strength=0.0), TokenFlowPropagator(), FixedKeyframes([1]), n_steps=STEPS)
    with UNetCounter(tiny.unet) as counter:
        result = pipe.edit(clip_inversion, "a red texture", progress=False)
    assert result.timesteps == [] and result.keyframes == [] and counter.calls == 0 == result.unet_evaluations
    assert torch.equal(result.latents, clip_inversion.clean)


@pytest.mark.parametrize("propagator", ["tokenflow", "none"])
def test_end_to_end_unet_evaluations(tiny, clip_inversion, propagator):
    """N=4 frames, chunk 2, keyframes {1, 3}; strength 0.5 of 6 steps → 3 steps.

    TokenFlow carries the source branch for correspondences: 3 branches × N = 12 per step (36 in all):
    the keyframe pass (3 × K) and one chunk of the N - K other frames (keyframes keep their keyframe-pass
    result under the paper blend), 2 UNet calls per step; NoPropagation: 2 × N = 8 per step (24), 2 calls.
    """
    n, k, chunk = 4, 2, 2
    prop = TokenFlowPropagator() if propagator == "tokenflow" else NoPropagation()
    pipe = TokenFlowPipeline(tiny, SDEditEditor(strength=0.5), prop, FixedKeyframes([1, 3]), n_steps=STEPS,
                             chunk_size=chunk)
    with UNetCounter(tiny.unet) as counter:
        result = pipe.edit(clip_inversion, "a red texture", progress=False)
    steps = len(result.timesteps)
    assert steps == 3 and result.timesteps[0] == ddim_timesteps(tiny.scheduler, STEPS)[3]
    if propagator == "tokenflow":
        expected, calls = steps * 3 * n, steps * (1 + math.ceil((n - k) / chunk))
    else:
        expected, calls = steps * 2 * n, steps * math.ceil(n / chunk)
    assert result.unet_evaluations == counter.samples == expected and counter.calls == calls
    assert result.latents.shape == clip_inversion.clean.shape and torch.isfinite(result.latents).all()


def test_inversion_noise_at_the_noisiest_step_is_the_inverted_latent(tiny, clip_inversion):
    inputs = _inputs(tiny, clip_inversion)
    editor = SDEditEditor(strength=1.0)
    editor.prepare(inputs)
    steps = editor.timesteps(inputs.grid)
    x = editor.initial_latents(inputs, steps)
    assert steps[0] == clip_inversion.timesteps[0]
    assert torch.allclose(x, clip_inversion.at(steps[0]), atol=1e-5)


def test_random_noise_is_seeded_and_differs_from_inversion_noise(tiny, clip_inversion):
    inputs = _inputs(tiny, clip_inversion)
    state = torch.random.get_rng_state()
    start = lambda **kw: SDEditEditor(strength=0.5, **kw).initial_latents(inputs, inputs.grid[3:])
    a, b, c, d = start(noise="random", seed=3), start(noise="random", seed=3), start(noise="random", seed=4), start()
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)
    assert torch.equal(torch.random.get_rng_state(), state)  # a dedicated generator, the global RNG untouched
    noise = SDEditEditor(noise="random", seed=3).noise(inputs)
    assert torch.equal(noise[0], noise[-1])  # one draw shared by all frames


@pytest.mark.parametrize("bad, match", [
    (dict(strength=1.5), r"strength=1.5 must be in \[0, 1\]"), (dict(strength=-0.1), "strength"),
    (dict(noise="gauss"), "noise='gauss'"), (dict(start_slicing="off_by_one"), "start_slicing"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
])
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        SDEditEditor(**bad)
