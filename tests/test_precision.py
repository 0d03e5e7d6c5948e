"""Reduced precision (bf16 on CPU): only the UNet's inputs are cast; latents and DDIM arithmetic stay float32."""
from __future__ import annotations

import pytest
import torch

from tokenflow.core.inversion import DDIMInverter, reconstruct, sample
from tokenflow.core.pipeline import TokenFlowPipeline
from tokenflow.core.propagation import TokenFlowPropagator
from tokenflow.editors import PnPEditor
from tokenflow.models.ddim import ddim_timesteps, previous_timestep
from tokenflow.models.loading import load_model
from tokenflow.storage.video import Video

STEPS = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def bf16(cache_dir):
    return load_model("tiny", device="cpu", dtype="bfloat16", cache_dir=str(cache_dir))


def _clean(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class InputDtypes:
    """Records the dtypes of the UNet's sample and text inputs (forward pre-hook with kwargs)."""

    def __init__(self, unet):
        self.seen: set[tuple[torch.dtype, torch.dtype]] = set()
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.seen.add((args[0].dtype, kwargs["encoder_hidden_states"].dtype))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_bf16_round_trip_is_within_a_stated_factor_of_fp32(tiny, bf16):
    clean = _clean(n=1)
    errors = {}
    for name, model in (("fp32", tiny), ("bf16", bf16)):
        with InputDtypes(model.unet) as seen:
            inversion = DDIMInverter(n_steps=STEPS, keep_steps=STEPS).invert(model, clean, "a wolf", progress=False)
            recon = reconstruct(model, inversion, progress=False)
        assert seen.seen == {(model.dtype, model.dtype)}  # the UNet runs in the model's dtype...
        assert inversion.latents.dtype == inversion.clean.dtype == recon.dtype == torch.float32  # ...latents do not
        errors[name] = float((recon - clean).norm() / clean.norm())
    # measured (one random 8x8 latent, 10 steps, tiny sd21-base): fp32 0.04565, bf16 0.04570 — the error is
    # DDIM inversion's own (ε read one step off); bf16 UNet inputs and weights add 0.1 %.
    assert errors["fp32"] < 0.07, errors
    assert errors["bf16"] < 1.2 * errors["fp32"], errors


def test_sampling_keeps_float32_latents_between_bf16_unet_calls(bf16):
    """sample() equals a loop that casts only the UNet's inputs and steps DDIM in float32 (not in bf16)."""
    x = _clean(seed=1)
    text = bf16.encode_text(["a wolf"] * len(x))
    assert text.hidden.dtype == torch.bfloat16
    timesteps = ddim_timesteps(bf16.scheduler, 4)
    ours = sample(bf16, x, timesteps, text, progress=False)
    expected, rounded = x.clone(), x.clone()
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            alphas = (bf16.alpha(t), bf16.alpha(previous_timestep(timesteps, i)))
            eps = bf16.unet(expected.bfloat16(), t, encoder_hidden_states=text.hidden).sample.float()
            expected = (expected - (1 - alphas[0]) ** 0.5 * eps) / alphas[0] ** 0.5 * alphas[1] ** 0.5 + (1 - alphas[1]) ** 0.5 * eps
            eps_r = bf16.unet(rounded.bfloat16(), t, encoder_hidden_states=text.hidden).sample
            rounded = bf16.ddim_step(rounded.bfloat16(), eps_r, t, previous_timestep(timesteps, i)).bfloat16().float()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), float((ours - expected).abs().max())
    assert float((rounded - expected).abs().max()) > 1e-3  # a bf16 latent trajectory would be told apart


def test_pipeline_edit_latents_stay_float32_in_bf16(bf16):
    g = torch.Generator().manual_seed(0)
    video = Video.from_tensor(torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, fps=10.0, source="random")
    pipe = TokenFlowPipeline(bf16, PnPEditor(), TokenFlowPropagator(stride=2), n_steps=2)
    with InputDtypes(bf16.unet) as seen:
        result = pipe(video, "a fox", inversion_prompt="a wolf", progress=False)
    assert seen.seen == {(torch.bfloat16, torch.bfloat16)}
    assert result.latents.dtype == torch.float32 and torch.isfinite(result.latents).all()
    assert result.frames.shape == (3, 64, 64, 3)


def test_fp16_keeps_a_force_upcast_vae_in_float32(cache_dir):
    """SDXL's VAE overflows in fp16 (force_upcast); the VAE stays float32 while the UNet and text encoder cast."""
    model = load_model("tiny", device="cpu", dtype="float16", cache_dir=str(cache_dir))
    assert model.vae.config.force_upcast  # diffusers' default, as the SD 2.1-base config lists no value
    assert model.vae_dtype == torch.float32 and next(model.unet.parameters()).dtype == torch.float16
    assert next(model.text_encoder.parameters()).dtype == torch.float16
    latents = model.encode_images(torch.zeros(1, 3, 64, 64))
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
