"""Tiny FLUX.1-dev and FLUX.1-schnell: published configs, diffusers' loader, structure, determinism, calibration.

Each variant is built once for the module into a temp folder and loaded once. The transcribed published configs
are checked against the published parameter counts on the meta device.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch

from tokenflow.errors import ConfigError
from tokenflow.models.tiny import smooth_images
from tokenflow.models.tiny_flux import TinyFluxSpec, build_tiny_flux_pipeline, tiny_flux_folder
from tokenflow.models.variants_flux import (FLUX_CHECKPOINTS, FLUX_DEV, FLUX_SCHNELL, TINY_FLUX_DOUBLE_LAYERS,
                                            flux_checkpoint, tiny_flux)
from tokenflow.models.variants_mmdit import BYT5_VOCAB_SIZE, TINY_T5_LAYERS

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

VARIANTS = ["flux-dev", "flux-schnell"]
T5_TOKENS = 32  # max_sequence_length for the tests (fewer tokens: faster prompts)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """variant -> (folder, FluxPipeline), each built and loaded once for the module."""
    from diffusers import FluxPipeline

    cache = tmp_path_factory.mktemp("tiny-flux-cache")

    @functools.cache
    def get(variant: str):
        folder = tiny_flux_folder(cache, TinyFluxSpec(variant=variant))
        assert tiny_flux_folder(cache, TinyFluxSpec(variant=variant)) == folder  # built once, then found
        pipe = FluxPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        return folder, pipe
    return get


def _file_hashes(folder) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> its sha256."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- the transcribed published configs ----------------------------------------------------------------------

# FLUX.1-dev's transformer built from the transcription has 11,901,408,320 parameters (measured here on the meta
# device; "12B" on the model card, 11.9 B the figure the diffusers folder's safetensors index totals). schnell
# lacks the guidance embedder: 10,229,760 fewer (a 256 -> 3072 -> 3072 MLP), 11,891,178,560.
PUBLISHED_DEV, PUBLISHED_GUIDANCE_EMBEDDER = 11_901_408_320, 10_229_760
# The VAE has SD3's shape (83,819,683, see tests/test_tiny_mmdit.py); CLIP-L's text tower without projection
# 123,060,480 (SD3's CLIPTextModelWithProjection's 123,650,304 less its 768 x 768 projection); T5 v1.1 XXL's
# encoder 4,762,310,656.
PUBLISHED_VAE, PUBLISHED_CLIP_L, PUBLISHED_T5 = 83_819_683, 123_060_480, 4_762_310_656


def test_published_configs_have_the_published_structure_and_counts():
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        dev, schnell = (FluxTransformer2DModel(**c.transformer) for c in (FLUX_DEV, FLUX_SCHNELL))
        vae = AutoencoderKL(**FLUX_DEV.vae)
        clip = CLIPTextModel(CLIPTextConfig(**FLUX_DEV.text_encoders[0]))
        t5 = T5EncoderModel(T5Config(**FLUX_DEV.text_encoders[1]))
    for tr in (dev, schnell):
        assert (len(tr.transformer_blocks), len(tr.single_transformer_blocks)) == (19, 38)
        assert tr.config.num_attention_heads * tr.config.attention_head_dim == 3072 == tr.inner_dim
        assert sum(tr.config.axes_dims_rope) == tr.config.attention_head_dim == 128
    n = _count(dev)
    assert n == PUBLISHED_DEV and abs(n / 11.9e9 - 1) < 0.005, n
    assert _count(dev.time_text_embed.guidance_embedder) == PUBLISHED_GUIDANCE_EMBEDDER
    assert not hasattr(schnell.time_text_embed, "guidance_embedder")
    assert _count(schnell) == PUBLISHED_DEV - PUBLISHED_GUIDANCE_EMBEDDER
    assert (_count(vae), _count(clip), _count(t5)) == (PUBLISHED_VAE, PUBLISHED_CLIP_L, PUBLISHED_T5)
    assert FLUX_DEV.vae == FLUX_SCHNELL.vae and FLUX_DEV.text_encoders == FLUX_SCHNELL.text_encoders
    assert (FLUX_DEV.scheduler["use_dynamic_shifting"], FLUX_SCHNELL.scheduler["use_dynamic_shifting"]) == (True, False)
    assert (FLUX_DEV.scheduler["shift"], FLUX_SCHNELL.scheduler["shift"]) == (3.0, 1.0)


# ---- every structural feature survives the shrinking ------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_variant_keeps_the_published_structure(variant):
    pub = flux_checkpoint(variant)
    tiny = tiny_flux(pub)
    p, t = pub.transformer, tiny.transformer
    assert t["num_single_layers"] == 2 * t["num_layers"] == 2 * TINY_FLUX_DOUBLE_LAYERS
    assert p["num_single_layers"] == 2 * p["num_layers"]
    assert [4 * a for a in t["axes_dims_rope"]] == list(p["axes_dims_rope"])
    assert all(a % 2 == 0 for a in t["axes_dims_rope"]) and sum(t["axes_dims_rope"]) == t["attention_head_dim"] == 32
    assert t["num_attention_heads"] * t["attention_head_dim"] == 192
    for k in ("guidance_embeds", "patch_size", "in_channels", "out_channels"):
        assert t[k] == p[k], k
    assert t["joint_attention_dim"] == tiny.text_encoders[1]["d_model"] == 512
    assert t["pooled_projection_dim"] == tiny.text_encoders[0]["hidden_size"] == 96
    assert tiny.scheduler == pub.scheduler and tiny.index == pub.index
    assert {k: v for k, v in tiny.vae.items() if k not in ("block_out_channels", "norm_num_groups")} == \
           {k: v for k, v in pub.vae.items() if k not in ("block_out_channels", "norm_num_groups")}
    assert tiny.vae["block_out_channels"] == [16, 32, 64, 64] and tiny.vae["norm_num_groups"] == 4
    assert tiny.text_encoders[0]["num_hidden_layers"] == 12 and tiny.text_encoders[1]["num_layers"] == TINY_T5_LAYERS
    assert tiny.tokenizers[0] == pub.tokenizers[0] and tiny.tokenizers[1]["model_max_length"] == 512


# ---- the folder is a diffusers FluxPipeline ---------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_folder_loads_through_diffusers(built, variant):
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    folder, pipe = built(variant)
    ckpt = tiny_flux(flux_checkpoint(variant))
    tr = pipe.transformer
    assert {k: tr.config[k] for k in ckpt.transformer} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in ckpt.transformer.items()}
    assert (len(tr.transformer_blocks), len(tr.single_transformer_blocks)) == (TINY_FLUX_DOUBLE_LAYERS,
                                                                               2 * TINY_FLUX_DOUBLE_LAYERS)
    assert hasattr(tr.time_text_embed, "guidance_embedder") == (variant == "flux-dev")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert {k: pipe.scheduler.config[k] for k in ckpt.scheduler if k != "_class_name"} == \
           {k: v for k, v in flux_checkpoint(variant).scheduler.items() if k != "_class_name"}
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.vae.quant_conv is None and pipe.vae.post_quant_conv is None and pipe.vae.config.force_upcast
    assert type(pipe.text_encoder) is CLIPTextModel and not isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel) and isinstance(pipe.tokenizer_2, ByT5Tokenizer)
    assert len(pipe.tokenizer_2) == BYT5_VOCAB_SIZE == pipe.text_encoder_2.config.vocab_size
    assert pipe.tokenizer_max_length == 77 and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert (index["text_encoder"], index["text_encoder_2"]) == (["transformers", "CLIPTextModel"],
                                                                ["transformers", "T5EncoderModel"])
    assert json.loads((folder / "tiny_spec.json").read_text())["variant"] == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_runs_two_steps(built, variant):
    _, pipe = built(variant)

    def run(guidance: float):
        return pipe("a fox in the snow", num_inference_steps=2, height=64, width=64, guidance_scale=guidance,
                    output_type="latent", max_sequence_length=T5_TOKENS,
                    generator=torch.Generator().manual_seed(0)).images

    out = run(3.5)
    assert out.shape == (1, (64 // 16) ** 2, 64) and torch.isfinite(out).all()  # 2x2-packed 16-channel 8x8 latents
    assert torch.equal(run(3.5), out)
    # dev reads the guidance scale through its embedder; schnell has none and ignores it
    assert torch.equal(run(7.0), out) == (variant == "flux-schnell")


# ---- determinism ------------------------------------------------------------------------------------------

def test_builds_are_deterministic(built, tmp_path):
    folder, _ = built("flux-dev")
    state = torch.random.get_rng_state()
    build_tiny_flux_pipeline(tmp_path / "again", TinyFluxSpec())
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    build_tiny_flux_pipeline(tmp_path / "seed1", TinyFluxSpec(seed=1))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    again, seed1 = _file_hashes(tmp_path / "again"), _file_hashes(tmp_path / "seed1")
    assert again[weights] == _file_hashes(folder)[weights] != seed1[weights]
    assert again == _file_hashes(folder)  # every file, byte for byte


def test_spec_key_and_refusals():
    specs = [TinyFluxSpec(), TinyFluxSpec(seed=1), TinyFluxSpec(variant="flux-schnell"),
             TinyFluxSpec(output_damping=0.2)]
    assert len({s.key() for s in specs}) == len(specs) and TinyFluxSpec().key() == TinyFluxSpec().key()
    for refuse in (lambda: TinyFluxSpec(variant="flux-pro"), lambda: flux_checkpoint("flux-pro")):
        with pytest.raises(ConfigError, match="'flux-pro' is unknown — use one of flux-dev, flux-schnell"):
            refuse()
    assert list(FLUX_CHECKPOINTS) == VARIANTS
    with pytest.raises(ConfigError, match="output_damping"):
        TinyFluxSpec(output_damping=0)
    with pytest.raises(ConfigError, match="head_divisor"):
        tiny_flux(FLUX_DEV, head_divisor=8)  # RoPE axes 2:7:7 — odd


# ---- the two adjustments of the random model --------------------------------------------------------------

def test_vae_latents_have_unit_variance(built):
    """Normalised latents of smooth images (other ones than the calibration's) have std 1 (measured 1.02)."""
    vae = built("flux-dev")[1].vae
    with torch.no_grad():
        normalised = (vae.encode(smooth_images(seed=7)).latent_dist.mean - vae.config.shift_factor) \
            * vae.config.scaling_factor
    assert 0.8 <= normalised.std().item() <= 1.25, normalised.std().item()


# Euler ODE inversion (sigma 0 -> 1, velocity at the start of each step) then Euler sampling (1 -> 0) over the
# pipeline's 4 sigmas (linearly spaced, then shifted: dev's dynamic shift for 16 tokens, schnell's none), from the
# packed latents of a smooth 64 px image. Measured (seed 0): relative rms miss 0.0019 (dev) / 0.0017 (schnell),
# max |miss| 0.0074 / 0.0067, while inversion moved the latents by 0.059 / 0.063 rms; undamped (output_damping 1)
# dev misses by 0.10 rms. The bounds leave ~2.5x headroom.
ROUND_TRIP_STEPS = 4
ROUND_TRIP_REL_RMS, ROUND_TRIP_MAX_ABS = 0.005, 0.02


@pytest.mark.parametrize("variant", VARIANTS)
def test_euler_inversion_round_trips(built, variant):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    _, pipe = built(variant)
    vae, tr, sched = pipe.vae, pipe.transformer, pipe.scheduler
    with torch.no_grad():
        z = (vae.encode(smooth_images(seed=123, n=1, size=64)).latent_dist.mean - vae.config.shift_factor) \
            * vae.config.scaling_factor
        x0 = pipe._pack_latents(z, 1, 16, 8, 8)
        embeds, pooled, txt_ids = pipe.encode_prompt("a wolf", None, max_sequence_length=T5_TOKENS)
        img_ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        guidance = torch.tensor([3.5]) if tr.config.guidance_embeds else None

        def velocity(x, sigma):
            return tr(x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=torch.tensor([float(sigma)]),
                      img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample

        c = sched.config
        mu = calculate_shift(x0.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / ROUND_TRIP_STEPS, ROUND_TRIP_STEPS),
                            mu=mu if c.use_dynamic_shifting else None)
        down = sched.sigmas
        assert down[0] == 1 and down[-1] == 0 and len(down) == ROUND_TRIP_STEPS + 1
        up = down.flip(0)
        path = [x0]  # Euler steps sigma a -> b with the velocity at a: up to 1 (inversion), then back down to 0
        for a, b in [*zip(up[:-1], up[1:]), *zip(down[:-1], down[1:])]:
            path.append(path[-1] + (b - a) * velocity(path[-1], a))
    inverted, back = path[ROUND_TRIP_STEPS], path[-1]
    assert torch.isfinite(back).all()
    miss_rms, miss_max = (back - x0).pow(2).mean().sqrt().item(), (back - x0).abs().max().item()
    assert miss_rms / x0.std().item() < ROUND_TRIP_REL_RMS and miss_max < ROUND_TRIP_MAX_ABS, (miss_rms, miss_max)
    # the bound is not vacuous: inversion did move the latents
    assert (inverted - x0).pow(2).mean().sqrt().item() > 5 * miss_rms
