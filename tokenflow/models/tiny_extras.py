"""Tiny offline companions of the tiny model: a ControlNet and an InstructPix2Pix-style (8-channel) pipeline.

Both are built from config with seeded random weights, saved in diffusers' folder layout under the cache
dir (once, atomically) and loaded back with ``from_pretrained`` — the code path of real checkpoints.

* :func:`tiny_controlnet_folder`: a ControlNet shaped for a given UNet (``ControlNetModel.from_unet``
  without copying weights). A trained ControlNet starts with zero output convolutions; here they are
  random so its residuals are non-zero and tests can see them.
* :func:`tiny_ip2p_folder`: the tiny pipeline (:mod:`tokenflow.models.tiny`) with its UNet replaced by one
  taking 8 input channels (latents + image latents), as ``timbrooks/instruct-pix2pix``.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tokenflow.digests import json_digest
from tokenflow.models.tiny import TinyModelSpec, build_once, damped, tiny_model_folder
from tokenflow.rng import seeded_init

EXTRAS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TinyControlNetSpec:
    """Seed and widths of the tiny ControlNet; every field enters its cache key."""

    seed: int = 0
    conditioning_channels: tuple[int, ...] = (8, 8, 16, 16)  # conditioning embedding widths (3 downsamplings: 8x)
    output_scale: float = 1.0  # scale of the (normally zero-initialised) output convolutions' random weights
    # The condition's encoder gets variance-preserving (He) weights, its output this gain: with default
    # initialisers seven random convolutions attenuate the map so much that the condition barely matters.
    condition_gain: float = 5.0


def _key(*parts: object) -> str:
    return json_digest([*parts, EXTRAS_FORMAT_VERSION], 16)


def build_tiny_controlnet(unet: torch.nn.Module, spec: TinyControlNetSpec = TinyControlNetSpec()):
    """A ``ControlNetModel`` shaped for ``unet`` (only its config is read) with seeded random weights."""
    from diffusers import ControlNetModel

    with seeded_init(spec.seed):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=spec.conditioning_channels,
                                        load_weights_from_unet=False)
        with torch.no_grad():
            for conv in (m for m in net.controlnet_cond_embedding.modules() if isinstance(m, torch.nn.Conv2d)):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                torch.nn.init.zeros_(conv.bias)
            net.controlnet_cond_embedding.conv_out.weight.mul_(spec.condition_gain)
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:  # zero-initialised in diffusers
                conv.reset_parameters()
                conv.weight.mul_(spec.output_scale)
                conv.bias.mul_(spec.output_scale)
    return net


def tiny_controlnet_folder(cache_dir: str | os.PathLike, unet: torch.nn.Module,
                           spec: TinyControlNetSpec = TinyControlNetSpec()) -> Path:
    """The folder of the tiny ControlNet for ``unet``'s config and ``spec``, built once if absent."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # no load path or version
    key = _key("controlnet", config, asdict(spec))
    target = Path(cache_dir).expanduser() / "models" / f"tiny-controlnet-{key}"

    def build(folder: Path) -> None:
        build_tiny_controlnet(unet, spec).save_pretrained(folder)

    return build_once(target, "config.json", build)


def tiny_ip2p_folder(cache_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """The tiny pipeline with an 8-channel UNet (InstructPix2Pix layout), built once if absent."""
    from diffusers import UNet2DConditionModel

    base = tiny_model_folder(cache_dir, spec)
    target = Path(cache_dir).expanduser() / "models" / f"tiny-ip2p-{_key('ip2p', spec.key())}"

    def build(folder: Path) -> None:
        shutil.copytree(base, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet"))
        config = dict(UNet2DConditionModel.load_config(base / "unet"))
        config["in_channels"] = 2 * int(config["out_channels"])
        with seeded_init(spec.seed + 1):
            unet = UNet2DConditionModel.from_config(config)
        damped(unet, "conv_out", spec.output_damping)  # like the tiny model's, so DDIM inversion round-trips
        unet.save_pretrained(folder / "unet")
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = "StableDiffusionInstructPix2PixPipeline"
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))

    return build_once(target, "model_index.json", build)


def load_tiny_ip2p(device: str = "auto", dtype: str = "auto", cache_dir: str | None = None, tiny_seed: int = 0):
    """The tiny InstructPix2Pix-style model as a :class:`~tokenflow.models.DiffusionModel` (built once, cached)."""
    from tokenflow.models.loading import load_model
    from tokenflow.paths import default_cache_dir

    folder = tiny_ip2p_folder(cache_dir or default_cache_dir(), TinyModelSpec(seed=tiny_seed))
    return load_model(str(folder), device=device, dtype=dtype, local_files_only=True)
