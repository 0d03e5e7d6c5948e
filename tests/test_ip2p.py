"""InstructPix2PixEditor: diffusers' StableDiffusionInstructPix2PixPipeline as the oracle, image-conditioned
inversion and source branch, and a TokenFlow run on a tiny 8-channel UNet."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import translation_clip
from tokenflow import (DDIMInverter, InversionResult, NoPropagation, RandomKeyframes, TokenFlowPipeline,
                       TokenFlowPropagator, reconstruct)
from tokenflow.core.inversion import image_conditioning
from tokenflow.editors import InstructPix2PixEditor
from tokenflow.errors import ConfigError
from tokenflow.models.ddim import ddim_timesteps
from tokenflow.models.tiny_extras import load_tiny_ip2p

INSTRUCTION, NEGATIVE = "make it snowy", "blurry"


@pytest.fixture(scope="module")
def ip2p(cache_dir):
    return load_tiny_ip2p(device="cpu", dtype="float32", cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def clip():
    return translation_clip(n=4, size=64, shift=8)


def test_image_latents_are_the_unscaled_posterior_mode(ip2p, tiny, clip):
    images = clip.to_tensor()[:2]
    ours = image_conditioning(ip2p, ip2p.encode_images(images))
    with torch.no_grad():  # what diffusers' pipeline does: retrieve_latents(vae.encode(image), sample_mode="argmax")
        mode = ip2p.vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(ours, mode, atol=1e-6, rtol=1e-6)
    assert image_conditioning(tiny, torch.zeros(1, 4, 8, 8)) is None  # a text-to-image UNet reads none
    inpainting = SimpleNamespace(denoiser=SimpleNamespace(config=SimpleNamespace(in_channels=9)), latent_channels=4)
    with pytest.raises(ConfigError, match="this UNet takes 9 input channels — only text-to-image"):
        image_conditioning(inpainting, torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("image_guidance, branches", [(1.5, 3), (0.5, 1)], ids=["guided", "unguided"])
def test_per_frame_edit_equals_diffusers_ip2p_pipeline(ip2p, clip, image_guidance, branches):
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    steps, n = 3, 2
    images = clip.to_tensor()[:n]
    clean = ip2p.encode_images(images)
    x = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    given = InversionResult([ddim_timesteps(ip2p.scheduler, steps)[0]], x[None], clean, "", {})
    editor = InstructPix2PixEditor(guidance_scale=5.0, image_guidance_scale=image_guidance)
    result = TokenFlowPipeline(ip2p, editor, NoPropagation(), n_steps=steps, chunk_size=n).edit(
        given, INSTRUCTION, NEGATIVE, progress=False)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=ip2p.vae, text_encoder=ip2p.text_encoder, tokenizer=ip2p.tokenizer, unet=ip2p.unet,
        scheduler=DDIMScheduler.from_config(ip2p.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt=[INSTRUCTION] * n, negative_prompt=[NEGATIVE] * n, image=(images + 1) / 2, latents=x.clone(),
                    num_inference_steps=steps, guidance_scale=5.0, image_guidance_scale=image_guidance,
                    output_type="latent").images
    # the image latents are clean / scaling_factor here and the VAE mode there: equal to float rounding
    # (~1e-6 measured)
    torch.testing.assert_close(result.latents, expected, atol=1e-5, rtol=0)
    assert result.unet_evaluations == steps * branches * n  # no source branch without propagation
    assert (result.latents - x).abs().max() > 0.1


def test_image_conditioned_inversion_reconstructs(ip2p, clip):
    clean = ip2p.encode_images(clip.to_tensor()[:2])
    inversion = DDIMInverter(n_steps=10, keep_steps=10).invert(ip2p, clean, "", progress=False)
    error = (reconstruct(ip2p, inversion, progress=False) - clean).norm() / clean.norm()
    assert error < 0.01, float(error)  # 0.3 % measured


def test_tokenflow_run_feeds_image_latents_to_every_branch(ip2p, clip):
    steps = 2
    editor = InstructPix2PixEditor(guidance_scale=5.0, image_guidance_scale=1.5)
    pipe = TokenFlowPipeline(ip2p, editor, TokenFlowPropagator(), RandomKeyframes(stride=2, seed=0),
                             DDIMInverter(n_steps=steps, keep_steps=steps), n_steps=steps, chunk_size=2)
    seen, frames = [], []
    branches = editor.branches

    def spy(step):
        frames.append(step.frames.clone())
        return branches(step)

    editor.branches = spy
    handle = ip2p.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        result = pipe(clip, INSTRUCTION, NEGATIVE, inversion_prompt="", progress=False)
    finally:
        handle.remove()
    assert result.frames.shape == (4, 64, 64, 3)
    assert result.unet_evaluations == steps * 4 * 4  # (source, full, image, uncond) x 4 frames per step
    image = image_conditioning(ip2p, ip2p.encode_images(clip.to_tensor()))
    edit_calls = seen[-len(frames):]  # the inversion's calls came first
    for sample, f in zip(edit_calls, frames):
        rows = sample.unflatten(0, (4, len(f)))  # branches: source, full, image, uncond
        assert sample.shape[1] == 8
        for b in range(3):
            torch.testing.assert_close(rows[b, :, 4:], image[f], atol=1e-6, rtol=0)
        assert rows[3, :, 4:].abs().max() == 0


def test_wrong_model_or_settings_are_one_line(tiny, clip):
    from tokenflow import EditInputs

    clean = tiny.encode_images(clip.to_tensor()[:1])
    inputs = EditInputs(tiny, InversionResult([1], clean[None], clean, "", {}), "make it snowy", "", "", [1])
    with pytest.raises(ConfigError, match="editor=ip2p needs an InstructPix2Pix UNet .* is text-to-image") as e:
        InstructPix2PixEditor().prepare(inputs)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"editor.image_guidance_scale=-1.0 must be >= 0"):
        InstructPix2PixEditor(image_guidance_scale=-1.0)
