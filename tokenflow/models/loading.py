"""Load a Stable-Diffusion-family model: a hub id, a local folder, the offline ``tiny`` builds, or a pipeline.

One code path for all of them (``from_pretrained`` per component). Device and dtype are resolved here
and nowhere else (``auto``: CUDA + fp16 when available, else CPU + fp32).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.models.backbone import DiffusionModel
from tokenflow.models.tiny import DEFAULT_TINY_VARIANT

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` (``cuda:$LOCAL_RANK`` under torchrun) when available, else ``cpu``; anything else
    is passed to ``torch.device``."""
    if str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device(f"cuda:{int(local_rank) % torch.cuda.device_count()}" if local_rank else "cuda")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a torch device — use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here — use device=auto or device=cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` → fp16 on CUDA, fp32 elsewhere; names like ``float16``/``bf16`` map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown — use auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def _model_index(path: str, local_files_only: bool, revision: str | None) -> dict[str, Any]:
    """The folder's/repo's ``model_index.json`` (which components it has), or {} when there is none."""
    folder = Path(path)
    if folder.is_dir():
        index = folder / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision,
                                               local_files_only=local_files_only)).read_text())
    except Exception:  # offline or no index: load the SD components and let from_pretrained explain
        return {}


def _listed(index: dict[str, Any], name: str) -> bool:
    """Whether model_index.json lists the component ``name`` (``[null, null]`` means absent)."""
    return index.get(name) not in (None, [None, None])


def _is_sdxl(index: dict[str, Any], path: str) -> bool:
    """An SDXL folder: model_index.json lists text_encoder_2 (or, without an index, the folder has one).

    An SDXL refiner (text_encoder_2 only, aesthetic-score conditioning) is refused in one line.
    """
    has_second = _listed(index, "text_encoder_2") if index else (Path(path) / "text_encoder_2").is_dir()
    if has_second and ((index and not _listed(index, "text_encoder")) or index.get("requires_aesthetics_score")):
        raise ModelLoadError(f"'{path}' is an SDXL refiner (no first text encoder, aesthetic-score conditioning) — "
                             "TokenFlow edits with a text-to-image base model, e.g. stabilityai/stable-diffusion-xl-base-1.0")
    return has_second


def as_model(obj: Any) -> DiffusionModel:
    """``obj`` as a :class:`DiffusionModel`: itself, or a diffusers pipeline's components; anything else is refused."""
    if isinstance(obj, DiffusionModel):
        return obj
    if all(hasattr(obj, name) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
        return from_pipeline(obj)
    raise ModelLoadError(f"expected a model, got {type(obj).__name__} — pass load_model(...)'s result or a loaded "
                         "StableDiffusionPipeline/StableDiffusionXLPipeline")


def load_model(source: str | Any, device: str = "auto", dtype: str = "auto", revision: str | None = None,
               variant: str | None = None, local_files_only: bool = False, cache_dir: str | None = None,
               tiny_seed: int = 0, tiny_variant: str = DEFAULT_TINY_VARIANT) -> DiffusionModel:
    """Load SD 1.x/2.x or SDXL components from a hub id, a local folder, or ``tiny`` (built offline, cached).

    ``tiny``: the offline test model, of ``tiny_variant`` (sd15, sd21-base, sd21 or sdxl: the published
    config of that checkpoint with tiny widths, see :mod:`tokenflow.models.variants`), built once under
    ``cache_dir`` (default: the library's user cache dir) and then loaded like any folder. An already
    loaded diffusers pipeline is accepted too (see :func:`from_pipeline`).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not isinstance(source, (str, Path)):  # an already loaded pipeline or model
        return as_model(source) if device == "auto" and dtype == "auto" else from_pipeline(
            source, None if device == "auto" else device, None if dtype == "auto" else dtype)
    source = str(source)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    identity = source
    if source == "tiny":
        from tokenflow.models.tiny import TinyModelSpec, tiny_model_folder
        from tokenflow.paths import default_cache_dir

        spec = TinyModelSpec(seed=tiny_seed, variant=tiny_variant)
        path = str(tiny_model_folder(cache_dir or default_cache_dir(), spec))
        identity = f"tiny:{tiny_variant}:{spec.key()}"
        local_files_only = True
    else:
        path = source
        if Path(source).expanduser().exists():
            path = str(Path(source).expanduser().resolve())
            if not (Path(path) / "unet").is_dir():
                raise ModelLoadError(f"model folder '{path}' has no unet/ subfolder — point model.source at a "
                                     "diffusers Stable Diffusion folder (save_pretrained layout)")
            identity = path
        elif source.startswith((".", "/", "~")):
            raise ModelLoadError(f"model folder '{source}' does not exist — check the path or use a hub id")
    kw: dict[str, Any] = dict(revision=revision, local_files_only=local_files_only)
    index = _model_index(path, local_files_only, revision)
    sdxl = _is_sdxl(index, path)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype, variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype, variant=variant, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch_dtype,
                                                     variant=variant, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        text_encoder_2 = tokenizer_2 = None
        if sdxl:
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                         torch_dtype=torch_dtype, variant=variant, **kw)
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot load model '{source}': {first[:200]} — check the id/path, download it first while online "
            "(or set HF_HUB_OFFLINE=0), or use model=tiny for the offline test model") from e
    return _assemble(vae, text_encoder, tokenizer, unet, scheduler, dev, torch_dtype, identity, text_encoder_2,
                     tokenizer_2)


def _assemble(vae, text_encoder, tokenizer, unet, scheduler, device: torch.device, dtype: torch.dtype, identity: str,
              text_encoder_2=None, tokenizer_2=None) -> DiffusionModel:
    """Move the components to one device/dtype (the VAE in float32 where its config asks), eval, no grads."""
    for part in (unet, vae, text_encoder, text_encoder_2):
        if part is not None:
            part.to(device)
            if next(part.parameters()).dtype != dtype:
                part.to(dtype)
            part.eval().requires_grad_(False)
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (diffusers upcasts it the same way)
    log.info("loaded %s on %s (%s)", identity, device, str(dtype).replace("torch.", ""))
    return DiffusionModel(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                          device=device, dtype=dtype, identity=identity, text_encoder_2=text_encoder_2,
                          tokenizer_2=tokenizer_2)


def from_pipeline(pipe: Any, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> DiffusionModel:
    """A :class:`DiffusionModel` sharing the components of a loaded diffusers pipeline (LoRA weights and all).

    Accepts ``StableDiffusionPipeline``-like and ``StableDiffusionXLPipeline``-like objects (anything with
    ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``); the scheduler's config is used
    for DDIM. ``device``/``dtype`` default to the UNet's.
    """
    from diffusers import DDIMScheduler

    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if getattr(pipe, name, None) is None]
    if missing:
        raise ModelLoadError(f"{type(pipe).__name__} is not a Stable Diffusion pipeline (it has no {', '.join(missing)}) — "
                             "pass a StableDiffusionPipeline/StableDiffusionXLPipeline, a hub id or a folder")
    unet = pipe.unet
    dev = torch.device(device) if device is not None else next(unet.parameters()).device
    torch_dtype = resolve_dtype(dtype, dev) if dtype is not None else next(unet.parameters()).dtype
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return _assemble(pipe.vae, pipe.text_encoder, pipe.tokenizer, unet, scheduler, dev, torch_dtype, f"pipeline:{name}",
                     getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))
