"""Model loading: the tiny model is deterministic and SD-shaped; bad sources fail with one clear line."""
from __future__ import annotations

import hashlib

import pytest
import torch

from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.models.layout import UNetLayout
from tokenflow.models.loading import load_model, resolve_device, resolve_dtype
from tokenflow.models.tiny import TinyModelSpec, build_tiny_pipeline


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_tiny_build_is_deterministic(tmp_path):
    spec = TinyModelSpec(seed=3)
    build_tiny_pipeline(tmp_path / "a", spec)
    build_tiny_pipeline(tmp_path / "b", spec)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    build_tiny_pipeline(tmp_path / "c", TinyModelSpec(seed=4))
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_tiny_has_sd_topology_and_hook_sites(tiny):
    layout = UNetLayout.from_unet(tiny.unet)
    assert len(layout.self_attention) == 16  # 2x3 down, 1 mid, 3x3 up, as SD 1.5/2.1
    assert [layout.stage[n] for n in layout.self_attention].count("mid") == 1
    assert len(layout.decoder) == 12
    assert layout.decoder_resnet_output(4) == "up_blocks.1.resnets.1.conv2"  # PnP's residual injection site
    assert layout.decoder_self_attention(range(4, 12))[0] == "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    with pytest.raises(ConfigError, match="decoder layer 1 has no self-attention"):
        layout.decoder_self_attention([1])
    assert tiny.unet.config.layers_per_block == 2 and len(tiny.vae.config.block_out_channels) == 4  # 8x VAE


def test_tiny_components_work(tiny):
    emb = tiny.encode_text(["a wolf", ""])
    assert emb.hidden.shape == (2, 77, tiny.text_encoder.config.hidden_size) and emb.pooled is None
    assert tiny.tokenizer("a wolf").input_ids == [49406, 320, 5916, 49407]  # real CLIP BPE ids
    images = torch.rand(2, 3, 64, 128) * 2 - 1
    latents = tiny.encode_images(images)
    assert latents.shape == (2, 4, 8, 16)
    assert tiny.decode_latents(latents).shape == images.shape
    assert tiny.scheduler.config.steps_offset == 1 and not tiny.scheduler.config.set_alpha_to_one


def test_fingerprint_is_stable_and_model_specific(tiny, cache_dir):
    again = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir))
    assert again.fingerprint == tiny.fingerprint
    other = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_seed=1)
    assert other.fingerprint != tiny.fingerprint


def test_local_folder_loads_through_the_same_path(tiny, cache_dir):
    folder = next((cache_dir / "models").glob("tiny-*"))
    model = load_model(str(folder), device="cpu", dtype="float32")
    assert model.fingerprint == tiny.fingerprint


def test_unknown_model_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot load model 'nobody/no-such-model'") as err:
        load_model("nobody/no-such-model", device="cpu", local_files_only=True)
    assert "\n" not in str(err.value)


def test_missing_or_wrong_local_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelLoadError, match="no unet/ subfolder"):
        load_model(str(tmp_path), device="cpu")


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    auto = resolve_device("auto")
    assert resolve_dtype("auto", auto) == (torch.float16 if auto.type == "cuda" else torch.float32)
    assert resolve_dtype("bf16", auto) == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype='float8'"):
        resolve_dtype("float8", auto)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
