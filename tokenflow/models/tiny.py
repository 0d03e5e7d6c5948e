"""Tiny, offline, deterministic versions of real Stable Diffusion checkpoints, for CPU tests and demos.

A tiny variant (:mod:`tokenflow.models.variants`) is the published configuration of SD 1.5, SD 2.1-base,
SD 2.1 (768, v-prediction) or SDXL base 1.0 with every width divided by 8 (head widths 64 → 8) and
everything else as published: block topology, transformer depths, text-encoder depth, linear projection,
attention upcast, scheduler and prediction type, VAE scaling factor and ``force_upcast``, tokenizer
padding, SDXL's two text encoders and added conditioning. Weights are random, drawn from the seed.
Two adjustments make the random model usable: the UNet's output layer is damped so DDIM inversion
round-trips, and the VAE encoder's mean is rescaled so latents of smooth images have unit variance
under the published ``scaling_factor`` (as real latents do). The tokenizers are the real CLIP BPE
(vocabulary shipped by the ``openai-clip`` package). The pipeline is saved in diffusers' folder layout
(``model_index.json`` listing every component) and loaded through the same ``from_pretrained`` path as
a real checkpoint.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from tokenflow.atomic import atomic_dir
from tokenflow.digests import json_digest
from tokenflow.errors import ModelLoadError
from tokenflow.models.variants import Checkpoint, checkpoint, tiny
from tokenflow.rng import seeded, seeded_init

# 3: tiny variants of real checkpoints (sd15, sd21-base, sd21, sdxl) replace the hand-made SD-shaped build
TINY_FORMAT_VERSION = 4  # 4: the latent-scale calibration is the same whatever the thread count
DEFAULT_TINY_VARIANT = "sd21-base"  # the official TokenFlow's backbone (SD 2.1-base)


@dataclass(frozen=True)
class TinyModelSpec:
    """Which checkpoint, how small, and the seed of the tiny pipeline; every field enters its cache key."""

    seed: int = 0
    variant: str = DEFAULT_TINY_VARIANT  # sd15 | sd21-base | sd21 | sdxl
    width_divisor: int = 8
    # Scale of the UNet's ``conv_out`` weights: a random UNet predicts large, rough noise and DDIM
    # inversion then diverges; damping makes it round-trip (see tests/test_inversion.py for the figure).
    output_damping: float = 0.1

    def __post_init__(self) -> None:
        checkpoint(self.variant)  # one clear error for an unknown variant

    def key(self) -> str:
        return json_digest({**asdict(self), "format": TINY_FORMAT_VERSION}, 16)


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
    """Build the tiny variant ``spec.variant`` from ``spec`` and save it in diffusers' layout under ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    ckpt = tiny(checkpoint(spec.variant), spec.width_divisor)
    with seeded_init(spec.seed):
        unet = damped(UNet2DConditionModel(**ckpt.unet), "conv_out", spec.output_damping)
        vae = AutoencoderKL(**ckpt.vae)
        text_encoders = _text_encoders(ckpt)
        _calibrate_latents(vae, spec.seed)
    save_components(folder, {"unet": unet, "vae": vae, **text_encoders})
    for i, options in enumerate(ckpt.tokenizers):
        _save_tokenizer(folder / _numbered("tokenizer", i), **options)
    _save_scheduler(folder / "scheduler", ckpt.scheduler)
    (folder / "model_index.json").write_text(json.dumps(_model_index(ckpt), indent=2))
    (folder / "tiny_spec.json").write_text(json.dumps({**asdict(spec), "format": TINY_FORMAT_VERSION}, indent=2))


@torch.no_grad()
def damped(model: torch.nn.Module, layer: str, factor: float) -> torch.nn.Module:
    """``model`` with its output ``layer``'s weight and bias scaled by ``factor`` (a random model's output is large)."""
    out = model.get_submodule(layer)
    out.weight.mul_(factor)
    out.bias.mul_(factor)
    return model


def save_components(folder: Path, parts: dict[str, torch.nn.Module]) -> None:
    """Each component in its subfolder, diffusers' layout."""
    for name, part in parts.items():
        part.save_pretrained(folder / name)


def _numbered(name: str, i: int) -> str:
    """diffusers' component names: text_encoder, text_encoder_2, ..."""
    return name if i == 0 else f"{name}_{i + 1}"


def _text_encoders(ckpt: Checkpoint) -> dict[str, torch.nn.Module]:
    """CLIPTextModel for the first encoder, CLIPTextModelWithProjection for SDXL's second (pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = {}
    for i, cfg in enumerate(ckpt.text_encoders):
        cls = CLIPTextModel if i == 0 else CLIPTextModelWithProjection
        out[_numbered("text_encoder", i)] = cls(CLIPTextConfig(**cfg))
    return out


def _save_tokenizer(folder: Path, model_max_length: int, pad_token: str) -> None:
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length,
                  pad_token=pad_token).save_pretrained(folder)


def _save_scheduler(folder: Path, config: dict) -> None:
    """The scheduler config file as published (its class and keys), which ``DDIMScheduler`` loads."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    body = {"_class_name": config["_class_name"], "_diffusers_version": diffusers.__version__,
            **{k: v for k, v in config.items() if k != "_class_name"}}
    (folder / "scheduler_config.json").write_text(json.dumps(body, indent=2))


def _model_index(ckpt: Checkpoint) -> dict:
    """model_index.json: the pipeline class, its flags, and every component's library and class."""
    import diffusers

    index = {"_class_name": ckpt.index["_class_name"], "_diffusers_version": diffusers.__version__,
             **{k: v for k, v in ckpt.index.items() if k != "_class_name"},
             "scheduler": ["diffusers", ckpt.scheduler["_class_name"]],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for i in range(len(ckpt.text_encoders)):
        index[_numbered("text_encoder", i)] = ["transformers", "CLIPTextModel" if i == 0 else "CLIPTextModelWithProjection"]
        index[_numbered("tokenizer", i)] = ["transformers", "CLIPTokenizer"]
    if not ckpt.is_sdxl:  # SD pipelines list these optional components (none in a tiny build)
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
    return dict(sorted(index.items(), key=lambda kv: (not kv[0].startswith("_"), kv[0])))


@torch.no_grad()
def _calibrate_latents(vae: torch.nn.Module, seed: int) -> None:
    """Rescale the encoder's mean so ``scaling_factor`` × latents of smooth images have unit variance.

    Real VAEs give latents whose std times the published scaling factor is about 1; a random VAE does
    not. The mean rows of ``quant_conv`` are scaled by s and ``post_quant_conv`` by 1/s, so decoding
    the new latents gives what the random decoder gave before.

    The same bytes on every machine: the forward runs on one thread (a sum's order, hence its last bits,
    follows the thread count) and s is rounded to 4 significant digits (kernels of other CPUs differ by ~1e-7).
    """
    s = latent_rescale(vae, seed)
    c = int(vae.config.latent_channels)
    vae.quant_conv.weight[:c].mul_(s)
    vae.quant_conv.bias[:c].mul_(s)
    vae.post_quant_conv.weight.div_(s)


def smooth_images(seed: int, n: int = 4, size: int = 128) -> torch.Tensor:
    """``n`` smooth random RGB images in [-1, 1]: bicubic upsampling of 8 x 8 uniform noise."""
    coarse = torch.rand(n, 3, 8, 8, generator=seeded(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def latent_rescale(vae: torch.nn.Module, seed: int) -> float:
    """s such that s x std(posterior mean) x ``scaling_factor`` = 1 on :func:`smooth_images` (a shift moves the mean
    only). One thread (a sum's order follows the thread count) and 4 significant digits: the same on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        std = vae.encode(smooth_images(seed)).latent_dist.mean.double().std().item()
    finally:
        torch.set_num_threads(threads)
    return float(f"{1.0 / (std * float(vae.config.scaling_factor)):.4g}")


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``target``, built once: ``build(staging)`` fills a temp folder beside it, renamed into place atomically
    (readers see the whole folder or none); ``marker``, a file inside, says the folder is complete."""
    if (target / marker).is_file():
        return target
    try:
        with atomic_dir(target, replace_empty=True) as staging:
            build(staging)
    except OSError:
        if not (target / marker).is_file():  # lost a race with nothing to show for it
            raise
    return target


def tiny_model_folder(cache_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Return the folder of the tiny pipeline for ``spec``, building it once (atomically) if absent."""
    target = Path(cache_dir).expanduser() / "models" / f"tiny-{spec.key()}"
    return build_once(target, "model_index.json", lambda folder: build_tiny_pipeline(folder, spec))
