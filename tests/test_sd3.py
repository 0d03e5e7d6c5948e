"""Stable Diffusion 3 / 3.5 as a backbone: outside oracles (diffusers' StableDiffusion3Pipeline on the same tiny
weights), Euler-ODE inversion, TokenFlow editing with each editor and propagator, and what is refused."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import translation_clip
from tokenflow import DDIMInverter, TokenFlowPipeline, invert_video
from tokenflow.core.inversion import reconstruct, sample
from tokenflow.core.propagation import NoPropagation, TokenFlowPropagator
from tokenflow.editors import CFGEditor, KVInjectionEditor, PnPEditor, SDEditEditor
from tokenflow.errors import ConfigError
from tokenflow.models.trajectory import InversionResult
from tokenflow.samplers import FlowMatchEulerSampler, sampler_for

STEPS = 4
T5_TOKENS = 32  # T5 tokens per prompt in these tests (the pipeline's 256 would be 90 % of every call's tokens)


@pytest.fixture(scope="module")
def sd35(cache_dir, one_thread):
    from tokenflow.models.loading import load_model

    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant="sd35-medium")
    model.max_sequence_length = T5_TOKENS
    return model


@pytest.fixture(scope="module")
def sd3(cache_dir, one_thread):
    from tokenflow.models.loading import load_model

    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant="sd3-medium")
    model.max_sequence_length = T5_TOKENS
    return model


def _pipe(model, with_t5: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=model.transformer, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
        text_encoder_3=model.text_encoder_3 if with_t5 else None, tokenizer_3=model.tokenizer_3 if with_t5 else None,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _without_t5(model):
    from dataclasses import replace

    return replace(model, text_encoder_3=None, tokenizer_3=None, fingerprint="")


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "zeros-in-t5-slot"])
def test_text_embedding_equals_the_pipelines(sd35, t5):
    model = sd35 if t5 else _without_t5(sd35)
    ours = model.encode_text(["a wolf", "a shiny silver robotic wolf"])
    with torch.no_grad():
        hidden, _, pooled, _ = _pipe(model, t5).encode_prompt("a wolf", None, None, do_classifier_free_guidance=False,
                                                                 max_sequence_length=T5_TOKENS)
    assert ours.hidden.shape == (2, 77 + T5_TOKENS, 512) and ours.pooled.shape == (2, 256)
    # the same computation; batching two prompts moves the last bits of the projections
    torch.testing.assert_close(ours.hidden[:1], hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled[:1], pooled, rtol=0, atol=1e-5)
    assert (ours.hidden[:, 77:].abs().sum() == 0) == (not t5)


@pytest.mark.parametrize("variant", ["sd35", "sd3"])
@pytest.mark.parametrize("guidance", [1.0, 4.5], ids=["no-cfg", "cfg"])
def test_independent_frames_equal_stable_diffusion_3_pipeline(request, variant, guidance):
    """Flow-matching sampling of independent frames (the library's sampler and backbone) equals diffusers'
    StableDiffusion3Pipeline from the same latents, with and without classifier-free guidance."""
    model = request.getfixturevalue(variant)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = model.encode_text("a wolf"), model.encode_text("blurry")
    grid = sampler_for(model.scheduler).grid(STEPS, model.image_seq_len((8, 8)))
    ours = sample(model, x, grid, cond, uncond, guidance, progress=False)
    with torch.no_grad():
        theirs = _pipe(model)(prompt="a wolf", negative_prompt="blurry", height=64, width=64, num_inference_steps=STEPS,
                              guidance_scale=guidance, latents=x.clone(), output_type="latent", num_images_per_prompt=2,
                              max_sequence_length=T5_TOKENS).images
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())
    assert float((ours - x).abs().max()) > 0.05  # the loop moved the latents (the damped tiny velocity is small)


def _given_latents(model, clip, x: torch.Tensor, grid) -> InversionResult:
    """An "inversion" holding only the given latents at the first level: sampling starts from them."""
    clean = model.encode_images(clip.to_tensor()[: len(x)])
    return InversionResult([grid.timesteps[0]], x[None].clone(), clean, "", {})


def test_the_tokenflow_pipeline_without_propagation_equals_the_diffusers_pipeline(sd35):
    """The whole edit path (TokenFlow's joint-attention processors installed, per-frame phase, the sampler's step)
    reproduces StableDiffusion3Pipeline frame by frame."""
    clip = translation_clip(n=2, size=64, shift=16)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe = TokenFlowPipeline(sd35, CFGEditor(guidance_scale=4.5), NoPropagation(), n_steps=STEPS)
    grid = pipe.sampler.grid(STEPS)
    result = pipe.edit(_given_latents(sd35, clip, x, grid), "a wolf", negative_prompt="blurry", progress=False)
    with torch.no_grad():
        theirs = _pipe(sd35)(prompt="a wolf", negative_prompt="blurry", height=64, width=64, num_inference_steps=STEPS,
                             guidance_scale=4.5, latents=x.clone(), output_type="latent", num_images_per_prompt=2,
                             max_sequence_length=T5_TOKENS).images
    assert torch.allclose(result.latents, theirs, atol=1e-4, rtol=0), float((result.latents - theirs).abs().max())
    assert result.unet_evaluations == 2 * 2 * STEPS  # two branches, two frames, every step
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in sd35.transformer.attn_processors.values())


def test_euler_inversion_round_trips_and_fixed_point_refinement_tightens_it(sd35):
    clip = translation_clip(n=2, size=64, shift=16)
    errors = {}
    for refine in (0, 2):
        inversion, _ = invert_video(sd35, clip, DDIMInverter(n_steps=STEPS, keep_steps=STEPS, fixed_point=refine),
                                    "a wolf", progress=False)
        assert inversion.timesteps == FlowMatchEulerSampler(sd35.scheduler).grid(STEPS).timesteps
        back = reconstruct(sd35, inversion, progress=False)
        errors[refine] = float((back - inversion.clean).norm() / inversion.clean.norm())
    # measured (2 frames 64x64, 4 steps, tiny SD 3.5): plain 3.6e-3, 2 fixed-point iterations 1.1e-5
    assert errors[0] < 0.02
    assert errors[2] < 0.1 * errors[0], errors


def test_injection_happens_at_exactly_the_named_blocks_and_steps(sd35):
    clip = translation_clip(n=4, size=64, shift=16)
    seen: set[tuple[str, int]] = set()
    editor = KVInjectionEditor(guidance_scale=2.0, inject_t=0.5, blocks=[1, 3])
    inner = editor.self_attention

    def spy(layer, q, k, v, step):
        q2, k2, v2 = inner(layer, q, k, v, step)
        if k2 is not k or v2 is not v:
            seen.add((layer, step.index))
        return q2, k2, v2

    editor.self_attention = spy  # instance attribute: the processors call it through the runtime's editor
    pipe = TokenFlowPipeline(sd35, editor, TokenFlowPropagator(), n_steps=STEPS,
                             inverter=DDIMInverter(n_steps=STEPS, keep_steps=STEPS))
    pipe(clip, "a robotic wolf", inversion_prompt="a wolf", progress=False)
    layout = sd35.layout()
    layers = {n for n in layout.self_attention if layout.block[n] in (1, 3)}
    assert layers == {"transformer_blocks.1.attn", "transformer_blocks.1.attn2", "transformer_blocks.3.attn",
                      "transformer_blocks.3.attn2"}  # SD 3.5's dual attention: both of each block
    assert seen == {(name, i) for name in layers for i in range(STEPS // 2)}


@pytest.mark.parametrize("propagator", ["tokenflow", "none"])
@pytest.mark.parametrize("editor", ["sdedit", "kv_injection"])
def test_tokenflow_edits_a_clip_on_sd35(sd35, editor, propagator):
    """Each editor x propagator runs end to end on SD 3.5 and gives finite, changed frames; TokenFlow costs
    3 x (N + K - K) transformer evaluations per step with the keyframe pass reused (N frames)."""
    clip = translation_clip(n=4, size=64, shift=16)
    make = {"sdedit": lambda: SDEditEditor(strength=1.0, guidance_scale=3.0),
            "kv_injection": lambda: KVInjectionEditor(guidance_scale=3.0)}[editor]
    prop = TokenFlowPropagator() if propagator == "tokenflow" else NoPropagation()
    pipe = TokenFlowPipeline(sd35, make(), prop, n_steps=STEPS, inverter=DDIMInverter(n_steps=STEPS, keep_steps=STEPS))
    result = pipe(clip, "a robotic wolf", inversion_prompt="a wolf", progress=False)
    assert result.frames.shape == (4, 64, 64, 3) and torch.isfinite(result.latents).all()
    branches = 3 if propagator == "tokenflow" or editor == "kv_injection" else 2
    assert result.unet_evaluations == branches * 4 * STEPS


def test_keyframes_propagate_their_tokens_on_a_static_clip(sd35):
    """A clip of one repeated frame: every token's nearest source neighbour is itself, so each non-keyframe takes
    exactly the keyframes' attention outputs and the edit is the same in every frame."""
    from tokenflow.storage.video import Video

    still = translation_clip(n=1, size=64).to_tensor()
    clip = Video.from_tensor(still.expand(5, -1, -1, -1).clone(), fps=10.0, source="still")
    matched = []
    pipe = TokenFlowPipeline(sd35, SDEditEditor(strength=1.0, guidance_scale=3.0), TokenFlowPropagator(),
                             n_steps=STEPS, inverter=DDIMInverter(n_steps=STEPS, keep_steps=STEPS))
    result = pipe(clip, "a robotic wolf", inversion_prompt="a wolf", progress=False,
                  on_match=lambda layer, frames, k, index, sim: matched.append(index))
    assert matched and all(torch.equal(i, torch.arange(i.shape[1]).expand_as(i)) for i in matched)
    spread = float((result.latents - result.latents[:1]).abs().max())
    assert spread < 1e-4, spread


def test_editors_that_drive_unet_blocks_are_refused_on_sd3_before_inversion(sd35):
    clip = translation_clip(n=2, size=64, shift=16)
    pipe = TokenFlowPipeline(sd35, PnPEditor(), TokenFlowPropagator(), n_steps=STEPS)
    with pytest.raises(ConfigError, match=r"PnPEditor drives an SD UNet .* not 'tiny:sd35-medium.*editor=sdedit or "
                                          r"editor=kv_injection"):
        pipe(clip, "a robotic wolf", inversion_prompt="a wolf", progress=False)
    from tokenflow.core.nulltext import NullTextInverter

    with pytest.raises(ConfigError, match="null-text inversion .* inverter=ddim"):
        NullTextInverter(n_steps=2).invert(sd35, torch.zeros(1, 16, 8, 8), "a wolf", progress=False)


def test_from_pipeline_and_the_fingerprint(sd35):
    from tokenflow.models.mmdit import SD3Model

    same = SD3Model.from_pipeline(_pipe(sd35))
    assert same.fingerprint == sd35.fingerprint and same.family == "mmdit"
    assert _without_t5(sd35).fingerprint != sd35.fingerprint  # the T5 slot is part of what the model computes


def test_both_backbones_implement_the_interface(sd35, tiny):
    from tokenflow.models.interface import Backbone

    assert isinstance(sd35, Backbone) and isinstance(tiny, Backbone)
    assert sd35.denoiser is sd35.transformer and tiny.denoiser is tiny.unet


def test_stored_keyframe_tokens_equal_the_estimate_on_sd35(sd35, monkeypatch):
    """What the joint-attention processors keep per keyframe and branch (every attn and attn2 layer's image-token
    outputs) is what the preflight's TransformerShape counts."""
    from tokenflow.core.attention import TokenFlowRuntime
    from tokenflow.core.memory import ModelShape, TransformerShape

    stored: list[tuple[int, int]] = []
    real_clear = TokenFlowRuntime.clear_step

    def record(runtime):
        if runtime.keyframe_tokens:
            stored.append((sum(t.outputs[0, 0].numel() for t in runtime.keyframe_tokens.values()),
                           len(runtime.keyframe_tokens)))
        real_clear(runtime)

    monkeypatch.setattr(TokenFlowRuntime, "clear_step", record)
    clip = translation_clip(n=3, size=64, shift=16)
    pipe = TokenFlowPipeline(sd35, SDEditEditor(strength=1.0, guidance_scale=2.0), TokenFlowPropagator(stride=2),
                             n_steps=2, inverter=DDIMInverter(n_steps=2, keep_steps=2))
    pipe(clip, "a fox", inversion_prompt="a wolf", progress=False)
    shape = ModelShape.from_model(sd35)
    assert isinstance(shape, TransformerShape) and stored
    total, layers = stored[0]
    assert layers == shape.attention_layers == len(sd35.layout().self_attention) == 24 + 13
    assert total == shape.self_attention_tokens(8, 8)


def test_propagated_blocks_are_a_knob_and_unet_stages_are_refused(sd35):
    clip = translation_clip(n=3, size=64, shift=16)
    prop = TokenFlowPropagator(stride=2, blocks=[0, 5])
    pipe = TokenFlowPipeline(sd35, SDEditEditor(strength=1.0, guidance_scale=2.0), prop, n_steps=2,
                             inverter=DDIMInverter(n_steps=2, keep_steps=2))
    pipe(clip, "a fox", inversion_prompt="a wolf", progress=False)
    assert {n for n in sd35.layout().self_attention if prop.propagates(n)} == {
        "transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.5.attn",
        "transformer_blocks.5.attn2"}
    for bad, message in ((dict(stages=["up"]), "propagator.stages names UNet stages"),
                         (dict(blocks=[24]), "block 24 does not exist — this transformer has blocks 0-23")):
        pipe.propagator = TokenFlowPropagator(stride=2, **bad)
        with pytest.raises(ConfigError, match=message):
            pipe(clip, "a fox", inversion_prompt="a wolf", progress=False)


def test_bounded_keyframe_attention_runs_on_sd35(sd35):
    """experiment=long_video's anchors on joint attention: every frame stepped once per step (3N evaluations)."""
    from tokenflow.core.attention import KeyframeAttention
    from tokenflow.core.keyframes import RandomKeyframes

    clip = translation_clip(n=6, size=64, shift=16)
    pipe = TokenFlowPipeline(sd35, KVInjectionEditor(guidance_scale=2.0), TokenFlowPropagator(stride=2),
                             RandomKeyframes(2, seed=0), n_steps=2, chunk_size=2,
                             inverter=DDIMInverter(n_steps=2, keep_steps=2),
                             attention=KeyframeAttention(context="anchors", anchors=2, segment=2))
    result = pipe(clip, "a fox", inversion_prompt="a wolf", progress=False)
    assert torch.isfinite(result.latents).all() and result.unet_evaluations == 3 * 6 * 2
