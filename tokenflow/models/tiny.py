"""A tiny, offline, deterministic Stable-Diffusion-shaped pipeline for CPU tests and demos.

Same block topology as SD 1.5/2.1 (3 CrossAttnDown + 1 Down, cross-attention mid block, 1 Up + 3
CrossAttnUp, ``layers_per_block=2``, 8x VAE), so every hook site derived from the UNet config exists,
with tiny widths and random weights. The UNet's output layer is damped so DDIM inversion round-trips.
The tokenizer is the real CLIP BPE (vocabulary shipped by the ``openai-clip`` package).
The built pipeline is saved in diffusers' folder layout and loaded through the same code path as a
real checkpoint.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from tokenflow.errors import ModelLoadError

TINY_FORMAT_VERSION = 2


@dataclass(frozen=True)
class TinyModelSpec:
    """Widths and seed of the tiny pipeline; every field enters its cache key."""

    seed: int = 0
    variant: str = "sd21-base"
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    vae_channels: tuple[int, ...] = (16, 16, 32, 32)
    text_width: int = 32
    text_layers: int = 2
    attention_head_dim: int = 8
    norm_groups: int = 8
    # Scale of the UNet's ``conv_out`` weights: a random UNet predicts large, rough noise and DDIM
    # inversion then diverges; damping makes it round-trip (see tests/test_inversion.py for the figure).
    output_damping: float = 0.1

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "format": TINY_FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _clip_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` in the installed ``openai-clip`` distribution."""
    try:
        dist = metadata.distribution("openai-clip")
    except metadata.PackageNotFoundError as e:
        raise ModelLoadError("the tiny model needs the CLIP vocabulary from 'openai-clip' — pip install openai-clip") from e
    for f in dist.files or []:
        if f.name == "bpe_simple_vocab_16e6.txt.gz":
            return Path(dist.locate_file(f))
    raise ModelLoadError("'openai-clip' is installed but ships no bpe_simple_vocab_16e6.txt.gz — reinstall openai-clip")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table (as in CLIP's simple_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(folder: Path) -> None:
    """Convert CLIP's BPE file to ``vocab.json`` + ``merges.txt`` for ``transformers.CLIPTokenizer``."""
    with gzip.open(_clip_bpe_file(), "rt", encoding="utf-8") as fh:
        merges = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n", encoding="utf-8")


def build_tiny_pipeline(folder: Path, spec: TinyModelSpec = TinyModelSpec()) -> None:
    """Build the tiny pipeline from ``spec`` and save it in diffusers' layout under ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)  # module initialisers draw from the global RNG; restored below
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=spec.unet_channels,
            layers_per_block=2,
            cross_attention_dim=spec.text_width,
            attention_head_dim=spec.attention_head_dim,
            norm_num_groups=spec.norm_groups,
        )
        with torch.no_grad():
            unet.conv_out.weight.mul_(spec.output_damping)
            unet.conv_out.bias.mul_(spec.output_damping)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=spec.vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=spec.norm_groups,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=spec.text_width,
                intermediate_size=2 * spec.text_width,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=max(1, spec.text_width // 8),
                max_position_embeddings=77,
                projection_dim=spec.text_width,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
        vae.register_to_config(scaling_factor=_unit_variance_scale(vae, spec.seed))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    write_clip_tokenizer_files(folder / "tokenizer")
    CLIPTokenizer(str(folder / "tokenizer/vocab.json"), str(folder / "tokenizer/merges.txt"), model_max_length=77).save_pretrained(folder / "tokenizer")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.27.0",
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    (folder / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))


@torch.no_grad()
def _unit_variance_scale(vae: torch.nn.Module, seed: int) -> float:
    """Latent scaling factor giving unit-variance latents on smooth synthetic images, as SD's 0.18215 does."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(128, 128), mode="bicubic", align_corners=False).clamp(-1, 1)
    std = vae.encode(images).latent_dist.mean.std().item()
    return round(1.0 / std, 5)


def tiny_model_folder(cache_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Return the folder of the tiny pipeline for ``spec``, building it once (atomically) if absent."""
    target = Path(cache_dir).expanduser() / "models" / f"tiny-{spec.key()}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_pipeline(staging, spec)
        try:
            os.replace(staging, target)  # atomic: readers see the whole folder or none
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race with nothing to show for it
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
