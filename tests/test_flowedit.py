"""FlowEdit as a keyframe editor: the published update written out step by step on the tiny SD 3.5 and FLUX.1-dev
(propagation off), shared noise across frames, what TokenFlow adds, and what is refused."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import translation_clip
from tokenflow import TokenFlowPipeline
from tokenflow.core.keyframes import RandomKeyframes
from tokenflow.core.propagation import NoPropagation, TokenFlowPropagator
from tokenflow.editors import FlowEditEditor
from tokenflow.errors import ConfigError
from tokenflow.models.backbone import TextEmbedding
from tokenflow.samplers import model_sampler

STEPS = 4


@pytest.fixture(scope="module", params=["sd35-medium", "flux-dev"])
def model(request, cache_dir, one_thread):
    from tokenflow.models.loading import load_model

    return load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant=request.param,
                      max_sequence_length=16)


def _velocity(model, z, t, text, negative, scale, guidance_input):
    """The guided velocity of the published code: CFG over [negative, prompt] on SD 3, the guidance input on FLUX."""
    if guidance_input:
        return model.predict(z, t, text, guidance=torch.full((len(z),), scale))
    n = len(z)
    v = model.predict(torch.cat([z, z]), t, TextEmbedding.cat([negative.rows(torch.zeros(n, dtype=torch.long)),
                                                                 text.rows(torch.zeros(n, dtype=torch.long))]))
    u, c = v.chunk(2)
    return u + scale * (c - u)


def _by_hand(model, x0, n_max, n_min, n_avg, src_scale, tar_scale, seed):
    """FlowEdit (arXiv 2412.08629, Alg. 1 as fallenshock/FlowEdit runs it), one shared noise draw per step."""
    flux = getattr(model, "guidance_embedded", False)
    grid = model_sampler(model).grid(STEPS, model.image_seq_len(tuple(x0.shape[-2:])))
    src, tar, neg = model.encode_text("a wolf"), model.encode_text("a robotic wolf"), model.encode_text("")
    g = torch.Generator().manual_seed(seed)
    first = STEPS - min(n_max, STEPS)
    z, xt = x0.clone(), None
    for i in range(first, STEPS):
        level, after = grid.levels[i], grid.after(i)
        sigma, dt = level.value, after.value - level.value
        with torch.no_grad():
            if i < STEPS - n_min:
                delta = torch.zeros_like(x0)
                for _ in range(n_avg):
                    eps = torch.randn((1, *x0.shape[1:]), generator=g)
                    zs = (1 - sigma) * x0 + sigma * eps
                    zt = z + zs - x0
                    delta += (_velocity(model, zt, level.timestep, tar, neg, tar_scale, flux)
                              - _velocity(model, zs, level.timestep, src, neg, src_scale, flux)) / n_avg
                z = z + dt * delta
            else:
                if i == STEPS - n_min:
                    eps = torch.randn((1, *x0.shape[1:]), generator=g)
                    xt = z + (1 - sigma) * x0 + sigma * eps - x0
                xt = xt + dt * _velocity(model, xt, level.timestep, tar, neg, tar_scale, flux)
    return z if n_min == 0 else xt


@pytest.mark.parametrize("n_max, n_min, n_avg", [(3, 0, 1), (3, 1, 2), (9, 0, 1)])
def test_flowedit_equals_the_update_written_out_step_by_step(model, n_max, n_min, n_avg):
    clip = translation_clip(n=2, size=64, shift=16)
    x0 = model.encode_images(clip.to_tensor())
    scales = (1.5, 5.5) if getattr(model, "guidance_embedded", False) else (3.5, 13.5)
    editor = FlowEditEditor(n_max=n_max, n_min=n_min, n_avg=n_avg, src_guidance_scale=scales[0],
                            tar_guidance_scale=scales[1], seed=7)
    result = TokenFlowPipeline(model, editor, NoPropagation(), n_steps=STEPS)(
        clip, "a robotic wolf", "", "a wolf", progress=False)
    want = _by_hand(model, x0, n_max, n_min, n_avg, *scales, seed=7)
    assert torch.allclose(result.latents, want, atol=1e-5, rtol=0), float((result.latents - want).abs().max())
    assert float((result.latents - x0).abs().max()) > 1e-3  # it edited
    per_frame = 2 if getattr(model, "guidance_embedded", False) else 4
    edit_steps = min(n_max, STEPS) - n_min
    assert result.unet_evaluations == 2 * (per_frame * n_avg * edit_steps + per_frame // 2 * n_min)


def test_shared_noise_makes_a_static_clip_edit_alike_and_tokenflow_keeps_it(model):
    """One draw per step for all frames: a still clip gets the same edit in every frame, with or without TokenFlow;
    per-frame draws (shared_noise=false) make the frames differ."""
    from tokenflow.storage.video import Video

    still = translation_clip(n=1, size=64).to_tensor()
    clip = Video.from_tensor(still.expand(4, -1, -1, -1).clone(), fps=10.0, source="still")
    spreads = {}
    for name, prop, shared in (("none", NoPropagation(), True), ("tokenflow", TokenFlowPropagator(), True),
                               ("per-frame", NoPropagation(), False)):
        editor = FlowEditEditor(n_max=3, shared_noise=shared, src_guidance_scale=1.5, tar_guidance_scale=5.5)
        result = TokenFlowPipeline(model, editor, prop, RandomKeyframes(stride=2), n_steps=STEPS)(
            clip, "a robotic wolf", "", "a wolf", progress=False)
        spreads[name] = float((result.latents - result.latents[:1]).abs().max())
    assert spreads["none"] < 1e-5 and spreads["tokenflow"] < 1e-4, spreads
    assert spreads["per-frame"] > 1e-3, spreads


def test_flowedit_settings_and_pairings_are_checked(cache_dir):
    with pytest.raises(ConfigError, match="n_min=4 must be in"):
        FlowEditEditor(n_max=3, n_min=4)
    with pytest.raises(ConfigError, match="n_avg=0 must be >= 1"):
        FlowEditEditor(n_avg=0)
    from tokenflow.models.loading import load_model

    sd = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir))
    pipe = TokenFlowPipeline(sd, FlowEditEditor(), NoPropagation(), n_steps=STEPS)
    with pytest.raises(ConfigError, match="FlowEditEditor drives an MMDiT"):
        pipe(translation_clip(n=2, size=64), "a robotic wolf", "", "a wolf", progress=False)
