"""DDIM sampling and inversion against diffusers' own schedulers and pipelines on the same tiny weights.

Outside oracles: ``DDIMScheduler.step`` / ``DDIMInverseScheduler.step`` loops for every prediction type
(with and without CFG, with x0 clipping), ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``
(``output_type="latent"``, DDIM, the same starting latents, prompt and negative prompt), and
``StableDiffusionXLPipeline.encode_prompt`` for the SDXL text conditioning.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenflow.core.inversion import DDIMInverter, reconstruct, sample
from tokenflow.errors import ModelLoadError
from tokenflow.models.backbone import DiffusionModel
from tokenflow.models.ddim import ddim_timesteps
from tokenflow.models.loading import load_model

STEPS = 4
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def variants(cache_dir):
    """Tiny models by variant, loaded once for this module."""
    loaded: dict[str, DiffusionModel] = {}

    def get(name: str) -> DiffusionModel:
        if name not in loaded:
            loaded[name] = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant=name)
        return loaded[name]
    return get


def with_scheduler(model: DiffusionModel, **changes) -> DiffusionModel:
    """The same weights with a DDIM scheduler whose config has ``changes`` (e.g. another prediction type)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler.config, **changes)
    return dataclasses.replace(model, scheduler=scheduler, fingerprint=f"{model.fingerprint}:{sorted(changes.items())}")


def _latents(n: int = 2, hw: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, hw, hw, generator=torch.Generator().manual_seed(seed))


def diffusers_sampling(model: DiffusionModel, x: torch.Tensor, cond, uncond=None, guidance_scale: float = 1.0):
    """x (N, C, h, w) from the noisiest grid timestep down with DDIMScheduler.step and the raw UNet output."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        if uncond is None:
            out = model.unet(x, t, encoder_hidden_states=cond.expand(len(x), -1, -1)).sample
        else:
            text = torch.cat([uncond.expand(len(x), -1, -1), cond.expand(len(x), -1, -1)])
            out_u, out_c = model.unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)  # diffusers guides the raw output (ε, v or x0)
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sampling_equals_a_ddim_scheduler_loop(variants, prediction_type, guidance_scale):
    model = with_scheduler(variants("sd21-base"), prediction_type=prediction_type)
    cond, uncond = model.encode_text("a wolf"), model.encode_text("blurry")
    x = _latents()
    ours = sample(model, x, ddim_timesteps(model.scheduler, STEPS), cond, uncond, guidance_scale, progress=False)
    with torch.no_grad():
        theirs = diffusers_sampling(model, x, cond.hidden, uncond.hidden if guidance_scale != 1 else None, guidance_scale)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())
    assert float((ours - x).abs().max()) > 1e-2  # the loop moved the latents


def test_clipped_x0_matches_the_scheduler(variants):
    """clip_sample=True: x0 clamped, the direction keeps the model's ε (diffusers' default step)."""
    model = with_scheduler(variants("sd21-base"), clip_sample=True, clip_sample_range=0.5)
    cond = model.encode_text("a wolf")
    x = 3 * _latents()  # large enough that x0 is clipped at every step
    ours = sample(model, x, ddim_timesteps(model.scheduler, STEPS), cond, progress=False)
    with torch.no_grad():
        theirs = diffusers_sampling(model, x, cond.hidden)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())
    unclipped = sample(with_scheduler(model, clip_sample=False), x, ddim_timesteps(model.scheduler, STEPS), cond,
                       progress=False)
    assert float((unclipped - ours).abs().max()) > 0.1  # clipping was in effect


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_inversion_equals_a_ddim_inverse_scheduler_loop(variants, prediction_type):
    from diffusers import DDIMInverseScheduler

    model = with_scheduler(variants("sd21-base"), prediction_type=prediction_type)
    clean = _latents(seed=1)
    inversion = DDIMInverter(n_steps=STEPS, keep_steps=STEPS).invert(model, clean, "a wolf", progress=False)
    # DDIMInverseScheduler reads the grid from the same config (leading spacing, steps_offset 1: 1, 251,
    # 501, 751) and moves each latent from ᾱ at t - 1000/STEPS to ᾱ_t. Its first step starts below the
    # grid (t - Δ < 0) at `initial_alpha_cumprod`, which is 1 unless set_alpha_to_one=False makes it
    # ᾱ_0 — the `final_alpha_cumprod` our DDIM config (set_alpha_to_one=False) gives the level below the grid.
    inverse = DDIMInverseScheduler.from_config(model.scheduler.config, set_alpha_to_one=False)
    inverse.set_timesteps(STEPS)
    assert [int(t) for t in inverse.timesteps] == inversion.timesteps[::-1]
    cond, x, theirs = model.encode_text("a wolf").hidden.expand(len(clean), -1, -1), clean.clone(), []
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(model.unet(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
            theirs.append(x)
    theirs = torch.stack(theirs[::-1])  # noisiest first, as InversionResult keeps them
    assert inversion.latents.dtype == torch.float32
    assert torch.allclose(inversion.latents, theirs, atol=1e-4, rtol=0), float((inversion.latents - theirs).abs().max())


# Relative round-trip error ‖recon − z0‖/‖z0‖ of one random latent (8x8) at 10 steps, measured: epsilon 0.048,
# v_prediction 0.23, sample 0.019. The damped random UNet outputs ≈ 0, which for v_prediction means
# ε ≈ √(1-ᾱ)·x at the level it is read at: DDIM inversion's ε(x_t) ≈ ε(x_prev) approximation then errs
# at first order per step and the error falls as 1/steps (measured 0.39 at 5 steps, 0.10 at 25).
ROUND_TRIP_BOUND = {"epsilon": 0.07, "v_prediction": 0.3, "sample": 0.03}


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_inversion_round_trips_for_every_prediction_type(variants, prediction_type):
    model = with_scheduler(variants("sd21-base"), prediction_type=prediction_type)
    clean = _latents(n=1, seed=2)
    inversion = DDIMInverter(n_steps=10, keep_steps=10).invert(model, clean, "a wolf", progress=False)
    error = float((reconstruct(model, inversion, progress=False) - clean).norm() / clean.norm())
    assert error < ROUND_TRIP_BOUND[prediction_type], error
    moved = float((inversion.latents[0] - clean).norm() / clean.norm())
    assert moved > 0.1, moved  # it did move the latents (measured 0.88, 0.13, 33: a ≈ 0 output means ε, v or x0 ≈ 0)


@pytest.mark.parametrize("config, message", [
    (dict(prediction_type="flow"), "prediction_type='flow' is not supported"),
    (dict(thresholding=True), "thresholding=True"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
])
def test_unsupported_scheduler_settings_are_refused(variants, config, message):
    with pytest.raises(ModelLoadError, match=message) as err:
        with_scheduler(variants("sd21-base"), **config)
    assert "\n" not in str(err.value)


# ---- the SD and SDXL pipelines as oracles ------------------------------------------------------------

def _sd_pipeline(model: DiffusionModel):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("variant", ["sd15", "sd21-base", "sd21-768"])
def test_sampling_equals_the_stable_diffusion_pipeline(variants, variant):
    model = variants(variant)
    x, g = _latents(n=1, seed=3), 7.5
    with torch.no_grad():
        theirs = _sd_pipeline(model)("a wolf in the snow", negative_prompt="blurry, low quality", num_inference_steps=STEPS,
                                     guidance_scale=g, latents=x.clone(), height=64, width=64, output_type="latent").images
    cond, uncond = model.encode_text("a wolf in the snow"), model.encode_text("blurry, low quality")
    ours = sample(model, x, ddim_timesteps(model.scheduler, STEPS), cond, uncond, g, progress=False)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())


def _sdxl_pipeline(model: DiffusionModel):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
                                     tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
                                     scheduler=DDIMScheduler.from_config(model.scheduler.config),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def test_sdxl_text_conditioning_equals_encode_prompt(variants):
    model = variants("sdxl")
    pipe = _sdxl_pipeline(model)
    with torch.no_grad():
        hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(
            "a wolf in the snow", device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt="blurry")
    ours, ours_neg = model.encode_text("a wolf in the snow"), model.encode_text("blurry")
    assert ours.hidden.shape == (1, 77, 96 + 160) and ours.pooled.shape == (1, 160)  # CLIP-L/8 + bigG/8 widths
    for mine, theirs in ((ours.hidden, hidden), (ours.pooled, pooled), (ours_neg.hidden, neg_hidden),
                         (ours_neg.pooled, neg_pooled)):
        assert torch.allclose(mine, theirs, atol=1e-6, rtol=0), float((mine - theirs).abs().max())
    assert not torch.allclose(ours.pooled, ours_neg.pooled)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sdxl_sampling_equals_the_sdxl_pipeline(variants, guidance_scale):
    model = variants("sdxl")
    x = _latents(n=1, hw=8, seed=4)
    with torch.no_grad():
        theirs = _sdxl_pipeline(model)("a wolf in the snow", negative_prompt="blurry", num_inference_steps=STEPS,
                                       guidance_scale=guidance_scale, latents=x.clone(), height=64, width=64,
                                       output_type="latent").images
    cond, uncond = model.encode_text("a wolf in the snow"), model.encode_text("blurry")
    ours = sample(model, x, ddim_timesteps(model.scheduler, STEPS), cond, uncond, guidance_scale, progress=False)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())


def test_sdxl_micro_conditioning_is_the_frame_size(variants):
    """time_ids = [H, W, 0, 0, H, W] of the decoded frame: a different size changes the prediction."""
    model = variants("sdxl")
    assert model.time_ids(2, (8, 12)).tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    x, text = _latents(n=1, hw=8, seed=5), model.encode_text("a wolf")
    with torch.no_grad():
        eps = model.predict_noise(x, 501, text)
        expected = model.unet(x, 501, encoder_hidden_states=text.hidden, added_cond_kwargs={
            "text_embeds": text.pooled, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}).sample
        other = model.unet(x, 501, encoder_hidden_states=text.hidden, added_cond_kwargs={
            "text_embeds": text.pooled, "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])}).sample
    assert torch.equal(eps, expected) and not torch.allclose(eps, other, atol=1e-6)
