"""Model loading: real checkpoint configs and their tiny variants, content identity, one-line refusals."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch

from conftest import UNetCounter
from tokenflow.core.inversion import DDIMInverter
from tokenflow.core.video_inversion import invert_video
from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.models.backbone import check_architecture
from tokenflow.models.layout import UNetLayout
from tokenflow.models.loading import load_model, resolve_device, resolve_dtype
from tokenflow.models.tiny import DEFAULT_TINY_VARIANT, TinyModelSpec, build_tiny_pipeline, tiny_model_folder
from tokenflow.models.variants import CHECKPOINTS, checkpoint, tiny as tiny_config
from tokenflow.storage.cache import InversionCache
from tokenflow.storage.video import Video


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _on_meta(ckpt):
    """The checkpoint's UNet, VAE and text encoders built on the meta device (shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**ckpt.unet), AutoencoderKL(**ckpt.vae)
        texts = [(CLIPTextModel if i == 0 else CLIPTextModelWithProjection)(CLIPTextConfig(**cfg))
                 for i, cfg in enumerate(ckpt.text_encoders)]
    return unet, vae, texts


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Published parameter counts (an outside oracle for the transcribed configs): UNets 859,520,964 (SD 1.5,
# diffusers' num_parameters docstring), 865,910,724 (SD 2.x) and 2,567,463,684 (SDXL base); the VAE
# 83,653,863; text encoders CLIP ViT-L 123,060,480, OpenCLIP ViT-H (23 layers) 340,387,840, OpenCLIP
# bigG with projection 694,659,840 (SDXL's two encoders together: 817,720,320).
PUBLISHED = {
    "sd15": (859_520_964, 83_653_863, [123_060_480]),
    "sd21-base": (865_910_724, 83_653_863, [340_387_840]),
    "sd21-768": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_transcribed_configs_have_the_published_parameter_counts(name):
    unet, vae, texts = _on_meta(checkpoint(name))
    assert (_count(unet), _count(vae), [_count(t) for t in texts]) == PUBLISHED[name]


@pytest.mark.parametrize("name, conv, attn, n_self", [
    ("sd15", [4], list(range(4, 12)), 16), ("sd21-base", [4], list(range(4, 12)), 16), ("sd21-768", [4], list(range(4, 12)), 16),
    ("sdxl", [1], list(range(1, 6)), 70),  # SDXL: 2x1 + 2x10 down, 10 mid, 3x10 + 3x2 up transformer blocks
])
def test_pnp_sites_on_the_real_unets(name, conv, attn, n_self):
    """UNetLayout.pnp_layers() on the real UNets: SD decoder layer 4 and 4-11 (as published), SDXL 1 and 1-5."""
    unet, _, _ = _on_meta(checkpoint(name))
    layout = UNetLayout.from_unet(unet)
    assert layout.pnp_layers() == (conv, attn)
    assert len(layout.self_attention) == n_self
    first_up_attention = "up_blocks.1" if name != "sdxl" else "up_blocks.0"
    assert layout.decoder_resnet_output(conv[0]) == f"{first_up_attention}.resnets.1.conv2"
    assert layout.decoder_self_attention([conv[0]])[0] == f"{first_up_attention}.attentions.1.transformer_blocks.0.attn1"


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_tiny_variant_is_the_real_config_with_widths_divided(name):
    real, small = checkpoint(name), tiny_config(checkpoint(name), 8)
    scaled = {"block_out_channels", "norm_num_groups", "cross_attention_dim", "projection_class_embeddings_input_dim"}
    assert {k: v for k, v in small.unet.items() if k not in scaled} == {k: v for k, v in real.unet.items() if k not in scaled}
    assert small.unet["block_out_channels"] == [c // 8 for c in real.unet["block_out_channels"]]
    assert small.unet["cross_attention_dim"] == real.unet["cross_attention_dim"] // 8
    if real.is_sdxl:  # 6 time ids x 256 + the tiny pooled width, as 2816 = 6 x 256 + 1280
        assert small.unet["projection_class_embeddings_input_dim"] == 6 * 256 + 1280 // 8
    for a, b in zip(small.text_encoders, real.text_encoders):
        assert {k: v for k, v in a.items() if k not in ("hidden_size", "intermediate_size", "projection_dim")} == \
               {k: v for k, v in b.items() if k not in ("hidden_size", "intermediate_size", "projection_dim")}
        assert a["hidden_size"] * 8 == b["hidden_size"] and a["projection_dim"] * 8 == b["projection_dim"]
    assert {k: v for k, v in small.vae.items() if k not in ("block_out_channels", "norm_num_groups")} == \
           {k: v for k, v in real.vae.items() if k not in ("block_out_channels", "norm_num_groups")}
    assert (small.scheduler, small.tokenizers, small.index) == (real.scheduler, real.tokenizers, real.index)


def test_unknown_tiny_variant_is_one_clear_error():
    with pytest.raises(ConfigError, match="model variant 'sd3' is unknown — use one of sd15, sd21-base, sd21-768, sdxl"):
        load_model("tiny", device="cpu", tiny_variant="sd3")


def test_tiny_build_is_deterministic(tmp_path):
    spec = TinyModelSpec(seed=3, variant="sd15")
    build_tiny_pipeline(tmp_path / "a", spec)
    build_tiny_pipeline(tmp_path / "b", spec)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    build_tiny_pipeline(tmp_path / "c", TinyModelSpec(seed=4, variant="sd15"))
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_a_tiny_build_leaves_the_callers_rng_alone(tmp_path):
    """Module initialisers draw from the global RNG: a build seeds it in a fork, the caller's draws go on unchanged."""
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_pipeline(tmp_path / "a", TinyModelSpec(variant="sd15"))
    assert torch.equal(torch.rand(3), expected)


def test_build_once_publishes_the_whole_folder_or_nothing(tmp_path):
    from tokenflow.models.tiny import build_once

    target, staged = tmp_path / "models" / "tiny-x", []

    def fails(folder):
        staged.append(folder)
        (folder / "half").write_text("written before the disk filled up")
        raise OSError("No space left on device (simulated)")

    with pytest.raises(OSError, match="No space left"):
        build_once(target, "done", fails)
    assert staged[0].parent == target.parent and staged[0].name.startswith(".tiny-x.tmp-")  # owned: remove_stale
    assert not list(target.parent.iterdir())
    target.mkdir()  # an empty folder in its place is replaced
    assert (build_once(target, "done", lambda folder: (folder / "done").write_text("")) / "done").is_file()


def test_default_tiny_is_sd21_base_shaped(tiny):
    assert DEFAULT_TINY_VARIANT == "sd21-base" and tiny.identity.startswith("tiny:sd21-base:")
    layout = UNetLayout.from_unet(tiny.unet)
    assert len(layout.self_attention) == 16  # 2x3 down, 1 mid, 3x3 up, as SD 1.5/2.1
    assert [layout.stage[n] for n in layout.self_attention].count("mid") == 1
    assert len(layout.decoder) == 12
    assert layout.decoder_resnet_output(4) == "up_blocks.1.resnets.1.conv2"  # PnP's residual injection site
    assert layout.decoder_self_attention(range(4, 12))[0] == "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    with pytest.raises(ConfigError, match="decoder layer 1 has no self-attention"):
        layout.decoder_self_attention([1])
    cfg = tiny.unet.config
    assert cfg.use_linear_projection and list(cfg.attention_head_dim) == [5, 10, 20, 20]
    assert [tiny.unet.get_submodule(f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn1").heads for i in range(3)] == [5, 10, 20]
    assert cfg.layers_per_block == 2 and len(tiny.vae.config.block_out_channels) == 4  # 8x VAE
    assert tiny.text_encoder.config.num_hidden_layers == 23 and tiny.latent_scale == 0.18215


def test_tiny_components_work(tiny):
    emb = tiny.encode_text(["a wolf", ""])
    assert emb.hidden.shape == (2, 77, tiny.text_encoder.config.hidden_size) and emb.pooled is None
    assert tiny.tokenizer("a wolf").input_ids == [49406, 320, 5916, 49407]  # real CLIP BPE ids
    padded = tiny.tokenizer("a wolf", padding="max_length", max_length=77).input_ids
    assert padded[4:] == [0] * 73  # SD 2.x pads with "!" (id 0), as its tokenizer does
    images = torch.rand(2, 3, 64, 128) * 2 - 1
    latents = tiny.encode_images(images)
    assert latents.shape == (2, 4, 8, 16)
    assert tiny.decode_latents(latents).shape == images.shape
    assert tiny.scheduler.config.steps_offset == 1 and not tiny.scheduler.config.set_alpha_to_one
    assert not tiny.scheduler.config.clip_sample and tiny.prediction_type == "epsilon"


def test_tiny_latents_have_unit_variance(tiny):
    """The VAE's calibration: scaling_factor x latents of smooth images have std ~ 1, as SD's do."""
    g = torch.Generator().manual_seed(7)
    coarse = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(128, 128), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert 0.7 < float(tiny.encode_images(images).std()) < 1.4


def test_fingerprint_is_stable_and_model_specific(tiny, cache_dir):
    again = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir))
    assert again.fingerprint == tiny.fingerprint
    other = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_seed=1)
    assert other.fingerprint != tiny.fingerprint


def test_local_folder_loads_through_the_same_path(tiny, cache_dir):
    folder = tiny_model_folder(cache_dir, TinyModelSpec())
    model = load_model(str(folder), device="cpu", dtype="float32")
    assert model.fingerprint == tiny.fingerprint


# ---- cache identity: the fingerprint follows the content ------------------------------------------------

def _clip(seed: int = 0) -> Video:
    g = torch.Generator().manual_seed(seed)
    return Video.from_tensor(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, fps=10.0, source=f"random-{seed}")


def _linked_copy(src, dst, real: tuple[str, ...] = ()):
    """A model folder at ``dst``: components in ``real`` copied, the others symlinked to ``src``'s."""
    dst.mkdir()
    for item in src.iterdir():
        if item.name in real:
            (shutil.copytree if item.is_dir() else shutil.copy)(item, dst / item.name)
        else:
            (dst / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return dst


def test_inversion_cache_follows_the_weights_not_the_folder(tiny, cache_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_model_folder(cache_dir, TinyModelSpec())
    cache, inverter, video = InversionCache(tmp_path / "cache"), DDIMInverter(n_steps=3, keep_steps=3), _clip()
    with UNetCounter(tiny.unet) as first:
        _, hit = invert_video(tiny, video, inverter, "a wolf", cache, progress=False)
    assert not hit and first.calls == 3

    copied = load_model(str(shutil.copytree(src, tmp_path / "elsewhere")), device="cpu", dtype="float32")
    assert copied.fingerprint == tiny.fingerprint  # same weights from another folder: the cache hits
    with UNetCounter(copied.unet) as second:
        _, hit = invert_video(copied, video, inverter, "a wolf", cache, progress=False)
    assert hit and second.calls == 0

    edited = _linked_copy(src, tmp_path / "edited", real=("text_encoder",))
    weights = load_file(edited / "text_encoder" / "model.safetensors")
    name = next(k for k in sorted(weights) if weights[k].ndim == 2 and "layers.22" in k)  # the last layer
    weights[name][3, 5] = torch.nextafter(weights[name][3, 5], torch.tensor(1.0))  # one element, one ulp
    save_file(weights, edited / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    changed = load_model(str(edited), device="cpu", dtype="float32")
    assert changed.fingerprint != tiny.fingerprint
    with UNetCounter(changed.unet) as third:
        _, hit = invert_video(changed, video, inverter, "a wolf", cache, progress=False)
    assert not hit and third.calls == 3


def test_fingerprint_follows_the_scheduler_config(tiny, cache_dir, tmp_path):
    src = tiny_model_folder(cache_dir, TinyModelSpec())
    folder = _linked_copy(src, tmp_path / "model", real=("scheduler",))
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "timestep_spacing": "trailing"}))
    model = load_model(str(folder), device="cpu", dtype="float32")
    assert model.fingerprint != tiny.fingerprint
    path.write_text(json.dumps(config))
    assert load_model(str(folder), device="cpu", dtype="float32").fingerprint == tiny.fingerprint


# ---- refusals, one line each ------------------------------------------------------------------------

def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _save_unet(folder, **changes) -> None:
    """Replace the folder's UNet by the tiny SD 2.1-base one with config ``changes`` (random weights)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**{**tiny_config(checkpoint("sd21-base")).unet, **changes}).save_pretrained(folder / "unet")


def test_inpainting_unet_fails_the_edit_in_one_line(cache_dir, tmp_path):
    from tokenflow.core.pipeline import TokenFlowPipeline
    from tokenflow.editors import PnPEditor

    folder = _linked_copy(tiny_model_folder(cache_dir, TinyModelSpec()), tmp_path / "inpaint", real=())
    (folder / "unet").unlink()
    _save_unet(folder, in_channels=9)
    model = load_model(str(folder), device="cpu", dtype="float32")
    pipe = TokenFlowPipeline(model, PnPEditor(), n_steps=2)
    with pytest.raises(ConfigError, match="this UNet takes 9 input channels") as err:
        pipe(_clip(), "a fox", inversion_prompt="a wolf", progress=False)
    assert "text-to-image" in _one_line(err)
    with pytest.raises(ConfigError, match="takes 9 input channels but the call has 4 .*inpainting") as err:
        model.predict_noise(torch.zeros(1, 4, 8, 8), 501, model.encode_text("a wolf"))  # also below the pipeline
    _one_line(err)


def test_class_conditioned_unet_is_refused_at_load(cache_dir, tmp_path):
    folder = _linked_copy(tiny_model_folder(cache_dir, TinyModelSpec()), tmp_path / "upscaler", real=())
    (folder / "unet").unlink()
    _save_unet(folder, num_class_embeds=1000)  # e.g. the x4 upscaler's noise-level classes
    with pytest.raises(ModelLoadError, match="class-conditioned") as err:
        load_model(str(folder), device="cpu", dtype="float32")
    _one_line(err)


def test_sdxl_refiner_is_refused(tmp_path):
    # a refiner folder: no first text encoder, aesthetic-score conditioning (refused before any weight is read)
    folder = tmp_path / "refiner"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
        "text_encoder": [None, None], "tokenizer": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    with pytest.raises(ModelLoadError, match="SDXL refiner") as err:
        load_model(str(folder), device="cpu")
    _one_line(err)
    # a refiner-shaped UNet next to both encoders: 5 time ids (size, crop, aesthetic score) x 256 + 1280 = 2560
    sdxl = checkpoint("sdxl")
    refiner = dataclasses.replace(sdxl, unet={**sdxl.unet, "projection_class_embeddings_input_dim": 2560})
    unet, _, texts = _on_meta(refiner)
    with pytest.raises(ModelLoadError, match="SDXL refiner") as err:
        check_architecture(unet, texts[1])
    _one_line(err)
    check_architecture(_on_meta(sdxl)[0], texts[1])  # the base passes


def test_unknown_prediction_type_is_refused_at_load(cache_dir, tmp_path):
    folder = _linked_copy(tiny_model_folder(cache_dir, TinyModelSpec()), tmp_path / "flow", real=("scheduler",))
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "flow_prediction"}))
    with pytest.raises(ModelLoadError, match="prediction_type='flow_prediction' is not supported") as err:
        load_model(str(folder), device="cpu", dtype="float32")
    _one_line(err)


def test_unknown_model_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot load model 'nobody/no-such-model'") as err:
        load_model("nobody/no-such-model", device="cpu", local_files_only=True)
    _one_line(err)


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


BUILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from pathlib import Path
from tokenflow.models.loading import load_model
from tokenflow.models.tiny import build_tiny_pipeline
build_tiny_pipeline(Path(sys.argv[1]))
print("fingerprint", load_model(sys.argv[1], device="cpu", dtype="float32").fingerprint)
"""


def test_the_tiny_model_is_the_same_bytes_whatever_the_thread_count(tmp_path):
    """Two machines (or one with another OMP_NUM_THREADS) build the same files under the same cache key."""
    import os
    import subprocess
    import sys

    folders, fingerprints = [], []
    for threads in (1, 2):
        folder = tmp_path / f"threads-{threads}"
        folder.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", BUILD, str(folder), str(threads)], check=True, env=env,
                              timeout=600, capture_output=True, text=True)
        fingerprints.append([line for line in done.stdout.splitlines() if line.startswith("fingerprint ")])
        folders.append(folder)
    assert len(fingerprints[0]) == 1 and fingerprints[0] == fingerprints[1], fingerprints  # the same model_fingerprint
    files = [{p.relative_to(f): p.read_bytes() for p in sorted(f.rglob("*")) if p.is_file()} for f in folders]
    assert files[0].keys() == files[1].keys() and any(k.suffix == ".safetensors" for k in files[0])
    differing = [str(k) for k in files[0] if files[0][k] != files[1][k]]
    assert not differing, differing


def test_tiny_variants_take_the_model_groups_names_and_sd21_is_refused():
    """model.tiny_variant reads the model group's spellings (model=sd21_768 -> sd21-768, sd3_medium, flux_dev);
    "sd21" names SD 2.1-base in the model group but was the 768-v model here: refused in one line, both named."""
    from pathlib import Path

    from tokenflow.models.variants import tiny_variant_name
    from tokenflow.models.variants_flux import FLUX_CHECKPOINTS
    from tokenflow.models.variants_mmdit import MMDIT_CHECKPOINTS

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    published = {**CHECKPOINTS, **MMDIT_CHECKPOINTS, **FLUX_CHECKPOINTS}
    for option in ("sd15", "sd21_768", "sdxl", "sd3_medium", "sd35_medium", "flux_dev", "flux_schnell"):
        assert (conf / f"{option}.yaml").is_file()
        assert tiny_variant_name(option) in published, option
    assert tiny_variant_name("sd21-base") == "sd21-base"
    with pytest.raises(ConfigError, match="tiny_variant=sd21 is ambiguous — model=sd21 is SD 2.1-base: use "
                                          "tiny_variant=sd21-base; .* is tiny_variant=sd21-768"):
        load_model("tiny", tiny_variant="sd21")
