"""Tiny SD3 Medium and SD3.5 Medium: published configs, diffusers' loaders, structure, determinism, calibration.

Each variant is built once per session (into $TOKENFLOW_CACHE when set) and loaded once per module. The
transcribed published configs are checked against the published parameter counts on the meta device.
"""
from __future__ import annotations

import copy
import hashlib
import shutil

import pytest
import torch

from tokenflow.errors import ConfigError
from tokenflow.models.tiny import smooth_images
from tokenflow.models.tiny_mmdit import TinyMMDiTSpec, _calibrate_latents, build_tiny_mmdit_pipeline, tiny_mmdit_folder
from tokenflow.models.variants_mmdit import (BYT5_VOCAB_SIZE, TINY_T5_LAYERS, MMDIT_CHECKPOINTS, SD3_MEDIUM, SD35_MEDIUM,
                                             mmdit_checkpoint, tiny_mmdit)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

VARIANTS = ["sd35-medium", "sd3-medium"]
T5_TOKENS = 32  # max_sequence_length for the tests (fewer tokens: faster prompts)


@pytest.fixture(scope="module")
def built(cache_dir):
    """variant -> (folder, StableDiffusion3Pipeline), each built and loaded once for the module."""
    from diffusers import StableDiffusion3Pipeline

    memo: dict = {}

    def get(variant: str):
        if variant not in memo:
            folder = tiny_mmdit_folder(cache_dir, TinyMMDiTSpec(variant=variant))
            pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
            pipe.set_progress_bar_config(disable=True)
            memo[variant] = folder, pipe
        return memo[variant]
    return get


def _digest(folder, pattern: str = "*") -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob(pattern) if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ---- the folder is a diffusers SD3 pipeline ---------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_folder_loads_through_diffusers(built, variant):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import ByT5Tokenizer, CLIPTextModelWithProjection, T5EncoderModel

    folder, pipe = built(variant)
    ckpt = tiny_mmdit(mmdit_checkpoint(variant))
    transformer = SD3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    assert {k: transformer.config[k] for k in ckpt.transformer} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in ckpt.transformer.items()}
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert not pipe.scheduler.config.use_dynamic_shifting
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.vae.quant_conv is None and pipe.vae.post_quant_conv is None and pipe.vae.config.force_upcast
    assert all(isinstance(e, CLIPTextModelWithProjection) for e in (pipe.text_encoder, pipe.text_encoder_2))
    assert isinstance(pipe.text_encoder_3, T5EncoderModel) and isinstance(pipe.tokenizer_3, ByT5Tokenizer)
    assert len(pipe.tokenizer_3) == BYT5_VOCAB_SIZE == pipe.text_encoder_3.config.vocab_size
    assert pipe.tokenizer_max_length == 77 and pipe.tokenizer_2.model_max_length == 77
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert pipe.image_encoder is None and pipe.feature_extractor is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_runs_two_steps(built, variant):
    _, pipe = built(variant)
    out = pipe("a fox in the snow", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
               output_type="latent", max_sequence_length=T5_TOKENS, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 8, 8) and torch.isfinite(out.images).all()


# ---- every structural feature survives the shrinking ------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_structure_is_the_published_one(built, variant):
    from diffusers.models.normalization import RMSNorm

    _, pipe = built(variant)
    tr = pipe.transformer
    dual = set(range(13)) if variant == "sd35-medium" else set()
    assert set(mmdit_checkpoint(variant).dual_attention_layers) == dual
    width = 24 * 8
    assert len(tr.transformer_blocks) == 24 and tr.config.caption_projection_dim == width
    assert [i for i, b in enumerate(tr.transformer_blocks) if getattr(b, "attn2", None) is not None] == sorted(dual)
    # MMDiT-X blocks modulate 9 streams (shift/scale/gate of attn, attn2, MLP), plain ones 6
    assert [b.norm1.linear.out_features // width for b in tr.transformer_blocks] == \
           [9 if i in dual else 6 for i in range(24)]
    for b in tr.transformer_blocks:
        if variant == "sd35-medium":
            assert isinstance(b.attn.norm_q, RMSNorm) and isinstance(b.attn.norm_k, RMSNorm)
        else:
            assert b.attn.norm_q is None and b.attn.norm_k is None
    side = 384 if variant == "sd35-medium" else 192
    assert tr.pos_embed.pos_embed.shape == (1, side * side, width)
    assert tr.config.patch_size == 2 and tr.config.in_channels == tr.config.out_channels == 16
    assert tr.config.joint_attention_dim == pipe.text_encoder_3.config.d_model == 512
    assert tr.config.pooled_projection_dim == (pipe.text_encoder.config.projection_dim
                                               + pipe.text_encoder_2.config.projection_dim) == 256
    assert [pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers,
            pipe.text_encoder_3.config.num_layers] == [12, 32, TINY_T5_LAYERS]  # T5's depth reduced (tiny_mmdit)
    assert pipe.text_encoder_3.config.feed_forward_proj == "gated-gelu"


# ---- determinism ------------------------------------------------------------------------------------------

def test_builds_are_deterministic(built, tmp_path):
    folder, _ = built("sd3-medium")  # the smaller positional table: the cheaper rebuild
    state = torch.random.get_rng_state()
    build_tiny_mmdit_pipeline(tmp_path / "again", TinyMMDiTSpec(variant="sd3-medium"))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    build_tiny_mmdit_pipeline(tmp_path / "seed1", TinyMMDiTSpec(variant="sd3-medium", seed=1))
    try:
        assert _digest(tmp_path / "again") == _digest(folder)  # every file, byte for byte
        assert _digest(tmp_path / "seed1" / "transformer", "*.safetensors") != _digest(folder / "transformer", "*.safetensors")
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # ~1 GB


def test_spec_key_and_refusals():
    specs = [TinyMMDiTSpec(), TinyMMDiTSpec(seed=1), TinyMMDiTSpec(variant="sd3-medium"),
             TinyMMDiTSpec(width_divisor=4), TinyMMDiTSpec(output_damping=0.2)]
    assert len({s.key() for s in specs}) == len(specs) and TinyMMDiTSpec().key() == TinyMMDiTSpec().key()
    with pytest.raises(ConfigError, match="sd3-medium"):
        TinyMMDiTSpec(variant="sd3-large")
    with pytest.raises(ConfigError, match="output_damping"):
        TinyMMDiTSpec(output_damping=0)
    with pytest.raises(ConfigError, match="divisor"):
        tiny_mmdit(SD3_MEDIUM, 3)


# ---- the two adjustments of the random model --------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_vae_latents_have_unit_variance(built, variant):
    """Normalised latents of smooth images (other ones than the calibration's) have std 1 (measured 0.99)."""
    _, pipe = built(variant)
    vae = pipe.vae
    with torch.no_grad():
        mean = vae.encode(smooth_images(seed=7)).latent_dist.mean
    std = ((mean - vae.config.shift_factor) * vae.config.scaling_factor).std().item()
    assert 0.8 <= std <= 1.25, std


def test_calibration_keeps_decode_of_encode():
    """The encoder's mean rows scale by s, the decoder's conv_in by 1/s: decode(encode(x)) does not move."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    raw = AutoencoderKL(**tiny_mmdit(SD35_MEDIUM).vae)
    vae = copy.deepcopy(raw)
    _calibrate_latents(vae, seed=0)
    x = smooth_images(seed=3, n=1, size=64)
    with torch.no_grad():
        before, after = raw.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean
        assert not torch.allclose(before, after)
        torch.testing.assert_close(vae.decode(after).sample, raw.decode(before).sample, rtol=1e-4, atol=1e-5)


# Euler ODE inversion (sigma 0 -> 1, velocity at the start of each step) then Euler sampling (1 -> 0) over the
# scheduler's 4 shifted sigmas, from the latents of a smooth 64 px image. Measured (sd35-medium, seed 0):
# relative rms miss 0.0040, max |miss| 0.011, while inversion moved the latents by ~0.06 rms; undamped
# (output_damping 1) the miss is 0.12 rms.
ROUND_TRIP_STEPS, ROUND_TRIP_REL_RMS, ROUND_TRIP_MAX_ABS = 4, 0.01, 0.03


@pytest.mark.parametrize("variant", VARIANTS)
def test_euler_inversion_round_trips(built, variant):
    _, pipe = built(variant)
    vae, tr = pipe.vae, pipe.transformer
    with torch.no_grad():
        x0 = (vae.encode(smooth_images(seed=123, n=1, size=64)).latent_dist.mean - vae.config.shift_factor) \
            * vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt("a wolf", None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)

        def velocity(x, sigma):
            t = torch.full((x.shape[0],), float(sigma) * pipe.scheduler.config.num_train_timesteps)
            return tr(x, embeds, pooled, t).sample

        pipe.scheduler.set_timesteps(ROUND_TRIP_STEPS)
        down = pipe.scheduler.sigmas  # 1 ... 0, shifted by 3
        assert down[0] == 1 and down[-1] == 0 and len(down) == ROUND_TRIP_STEPS + 1
        up = down.flip(0)
        x = x0
        for lo, hi in zip(up[:-1], up[1:]):
            x = x + (hi - lo) * velocity(x, lo)
        inverted = x
        for hi, lo in zip(down[:-1], down[1:]):
            x = x + (lo - hi) * velocity(x, hi)
    miss = x - x0
    rel_rms = (miss.pow(2).mean().sqrt() / x0.std()).item()
    assert torch.isfinite(x).all()
    assert rel_rms < ROUND_TRIP_REL_RMS and miss.abs().max().item() < ROUND_TRIP_MAX_ABS, (rel_rms, miss.abs().max())
    drift = (inverted - x0).pow(2).mean().sqrt().item()  # the bound is not vacuous: the model did move the latents
    assert drift > 5 * miss.pow(2).mean().sqrt().item(), drift


# ---- the transcribed published configs ----------------------------------------------------------------------

# Published sizes (outside oracles for the transcriptions). SD3 Medium's transformer: 2,028,328,000 parameters
# (NVIDIA aitune's inspect guide, the real stable-diffusion-3-medium-diffusers pipeline loaded; "2B" on the model
# card), its text encoders 123,650,304 / 694,659,840 / 4,762,310,656 and its VAE decoder 49,545,475 (same table).
# SD3.5 Medium's transformer file holds 2,469,663,936 elements: parameters plus the persistent 384^2 x 1536
# positional table (a checkpoint audit of a diffusers folder with that transformer; "2.5B" on the model card);
# the VAE file 83,819,683 (same audit).
PUBLISHED = {
    "sd3-medium": {"transformer": 2_028_328_000, "card": 2.0e9, "with_pos_embed": False},
    "sd35-medium": {"transformer": 2_469_663_936, "card": 2.5e9, "with_pos_embed": True},
}
PUBLISHED_VAE, PUBLISHED_VAE_DECODER = 83_819_683, 49_545_475
PUBLISHED_TEXT = [123_650_304, 694_659_840, 4_762_310_656]


def _count(module, pos_embed: bool = False) -> int:
    """Parameters, plus the persistent positional table when ``pos_embed`` (a buffer, but stored in the file)."""
    return sum(p.numel() for p in module.parameters()) + (module.pos_embed.pos_embed.numel() if pos_embed else 0)


@pytest.mark.parametrize("name", list(MMDIT_CHECKPOINTS))
def test_transcribed_configs_have_the_published_parameter_counts(name):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    ckpt, published = mmdit_checkpoint(name), PUBLISHED[name]
    with torch.device("meta"):
        transformer, vae = SD3Transformer2DModel(**ckpt.transformer), AutoencoderKL(**ckpt.vae)
        texts = [CLIPTextModelWithProjection(CLIPTextConfig(**ckpt.text_encoders[0])),
                 CLIPTextModelWithProjection(CLIPTextConfig(**ckpt.text_encoders[1])),
                 T5EncoderModel(T5Config(**ckpt.text_encoders[2]))]
    n = _count(transformer, pos_embed=published["with_pos_embed"])
    assert n == published["transformer"]
    assert abs(n / published["card"] - 1) < 0.02, n
    assert (_count(vae), _count(vae.decoder)) == (PUBLISHED_VAE, PUBLISHED_VAE_DECODER)
    assert [_count(t) for t in texts] == PUBLISHED_TEXT
