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
from tokenflow.models.flux import FluxModel
from tokenflow.models.mmdit import SD3Model
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


def _is_mmdit(index: dict[str, Any], path: str) -> bool:
    """An SD 3 folder: model_index.json names a StableDiffusion3 pipeline or lists a transformer and no unet."""
    if index:
        return str(index.get("_class_name", "")).startswith("StableDiffusion3") or (
            _listed(index, "transformer") and not _listed(index, "unet"))
    return (Path(path) / "transformer").is_dir() and not (Path(path) / "unet").is_dir()


def _is_flux(index: dict[str, Any], path: str) -> bool:
    """A FLUX.1 folder: model_index.json names a Flux pipeline (or, without an index, the transformer config names
    FluxTransformer2DModel)."""
    if index:
        return str(index.get("_class_name", "")).startswith("Flux")
    config = Path(path) / "transformer" / "config.json"
    try:
        return json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel"
    except (OSError, ValueError):
        return False


def as_model(obj: Any) -> "DiffusionModel | SD3Model | FluxModel":
    """``obj`` as a backbone: itself, or a diffusers pipeline's components; anything else is refused."""
    if isinstance(obj, (DiffusionModel, SD3Model, FluxModel)):
        return obj
    if all(hasattr(obj, name) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")) or \
            getattr(obj, "transformer", None) is not None:
        return from_pipeline(obj)
    raise ModelLoadError(f"expected a model, got {type(obj).__name__} — pass load_model(...)'s result or a loaded "
                         "StableDiffusionPipeline/StableDiffusionXLPipeline")


def load_model(source: str | Any, device: str = "auto", dtype: str = "auto", revision: str | None = None,
               variant: str | None = None, local_files_only: bool = False, cache_dir: str | None = None,
               tiny_seed: int = 0, tiny_variant: str = DEFAULT_TINY_VARIANT,
               max_sequence_length: int | None = None,
               guidance: float | None = None) -> "DiffusionModel | SD3Model | FluxModel":
    """Load SD 1.x/2.x, SDXL, SD 3/3.5 or FLUX.1 components from a hub id, a local folder, or ``tiny`` (built
    offline, cached).

    ``tiny``: the offline test model, of ``tiny_variant`` (sd15, sd21-base, sd21-768, sdxl, sd3-medium,
    sd35-medium, flux-dev or flux-schnell, or the ``model`` group's spelling: sd21_768, sd3_medium, ...: the published config of that checkpoint with tiny widths, see
    :mod:`tokenflow.models.variants`, :mod:`tokenflow.models.variants_mmdit` and
    :mod:`tokenflow.models.variants_flux`), built once under ``cache_dir`` (default: the library's user cache
    dir) and then loaded like any folder. An already loaded diffusers pipeline is accepted too (see
    :func:`from_pipeline`). ``max_sequence_length``: T5 tokens per prompt of an SD 3 / FLUX model (default the
    pipeline's: 256 for SD 3, 512 for FLUX). ``guidance``: FLUX.1-dev's guidance input for calls whose branch
    names none (default the pipeline's 3.5).
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
        from tokenflow.models.tiny_mmdit import TinyMMDiTSpec, tiny_mmdit_folder
        from tokenflow.models.variants import tiny_variant_name
        from tokenflow.models.variants_mmdit import MMDIT_CHECKPOINTS
        from tokenflow.paths import default_cache_dir

        tiny_variant = tiny_variant_name(tiny_variant)
        if tiny_variant in MMDIT_CHECKPOINTS:
            spec = TinyMMDiTSpec(seed=tiny_seed, variant=tiny_variant)
            path = str(tiny_mmdit_folder(cache_dir or default_cache_dir(), spec))
        elif str(tiny_variant).startswith("flux"):
            from tokenflow.models.tiny_flux import TinyFluxSpec, tiny_flux_folder

            spec = TinyFluxSpec(seed=tiny_seed, variant=tiny_variant)
            path = str(tiny_flux_folder(cache_dir or default_cache_dir(), spec))
        else:
            spec = TinyModelSpec(seed=tiny_seed, variant=tiny_variant)
            path = str(tiny_model_folder(cache_dir or default_cache_dir(), spec))
        identity = f"tiny:{tiny_variant}:{spec.key()}"
        local_files_only = True
    else:
        path = source
        if Path(source).expanduser().exists():
            path = str(Path(source).expanduser().resolve())
            if not (Path(path) / "unet").is_dir() and not (Path(path) / "transformer").is_dir():
                raise ModelLoadError(f"model folder '{path}' has no unet/ subfolder — point model.source at a "
                                     "diffusers Stable Diffusion folder (save_pretrained layout)")
            identity = path
        elif source.startswith((".", "/", "~")):
            raise ModelLoadError(f"model folder '{source}' does not exist — check the path or use a hub id")
    kw: dict[str, Any] = dict(revision=revision, local_files_only=local_files_only)
    index = _model_index(path, local_files_only, revision)
    flux = _is_flux(index, path)
    if guidance is not None and not flux:
        raise ConfigError(f"model.guidance={guidance} is FLUX.1-dev's guidance input; '{source}' has none (its editors "
                          "guide with editor.guidance_scale) — drop the setting")
    if flux or _is_mmdit(index, path):
        model = (_load_flux if flux else _load_mmdit)(path, source, identity, dev, torch_dtype, variant, index, kw)
        if max_sequence_length is not None:
            if not 1 <= int(max_sequence_length) <= 512:
                raise ConfigError(f"model.max_sequence_length={max_sequence_length} must be in 1..512 — T5 reads at "
                                  "most 512 tokens; 256 is the SD 3 pipeline's default, 512 FLUX's")
            model.max_sequence_length = int(max_sequence_length)
        if guidance is not None:
            model.guidance = _guidance(guidance, model)
        return model
    if max_sequence_length is not None:
        raise ConfigError(f"model.max_sequence_length={max_sequence_length} sets SD 3's T5 tokens; '{source}' is an SD "
                          "UNet model with CLIP's fixed 77 — drop the setting")
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
        raise _load_error(source, e, "model=tiny") from e
    return _assemble(vae, text_encoder, tokenizer, unet, scheduler, dev, torch_dtype, identity, text_encoder_2,
                     tokenizer_2)


def _load_error(source: str, error: Exception, tiny: str) -> ModelLoadError:
    """The one line for a checkpoint that cannot be loaded: the first line of the cause, and the fixes (``tiny``:
    the offline test model of the same family)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(f"cannot load model '{source}': {first[:200]} — check the id/path, download it first while "
                          f"online (or set HF_HUB_OFFLINE=0), or use {tiny} for the offline test model")


def _place(parts: list, vae, device: torch.device, dtype: torch.dtype) -> None:
    """Every component on ``device`` in ``dtype``, in eval mode without grads; the VAE in float32 under fp16
    where its config asks (SDXL's and SD 3's VAEs overflow in fp16; diffusers upcasts them the same way)."""
    for part in [*parts, vae]:
        if part is not None:
            part.to(device)
            if next(part.parameters()).dtype != dtype:
                part.to(dtype)
            part.eval().requires_grad_(False)
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)


def _load_mmdit(path: str, source: str, identity: str, device: torch.device, dtype: torch.dtype, variant: str | None,
                index: dict[str, Any], kw: dict[str, Any]) -> SD3Model:
    """The components of an SD 3 / 3.5 folder, each through its own ``from_pretrained`` (T5 only if listed)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    weights = dict(torch_dtype=dtype, variant=variant, **kw)
    try:
        parts: dict[str, Any] = {
            "transformer": SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **weights),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **weights),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
            "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        }
        if not index or _listed(index, "text_encoder_3"):
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **weights)
            parts["tokenizer_3"] = _listed_tokenizer(path, index, "tokenizer_3", kw) or AutoTokenizer.from_pretrained(
                path, subfolder="tokenizer_3", **kw)
    except (OSError, ValueError) as e:
        raise _load_error(source, e, "model=tiny model.tiny_variant=sd35-medium") from e
    return _assemble_mmdit(parts, device, dtype, identity)


def _load_flux(path: str, source: str, identity: str, device: torch.device, dtype: torch.dtype, variant: str | None,
               index: dict[str, Any], kw: dict[str, Any]) -> FluxModel:
    """The components of a FLUX.1 folder, each through its own ``from_pretrained``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    weights = dict(torch_dtype=dtype, variant=variant, **kw)
    try:
        parts: dict[str, Any] = {
            "transformer": FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **weights),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
            "text_encoder_2": T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **weights),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        }
        parts["tokenizer_2"] = _listed_tokenizer(path, index, "tokenizer_2", kw) or AutoTokenizer.from_pretrained(
            path, subfolder="tokenizer_2", **kw)
    except (OSError, ValueError) as e:
        raise _load_error(source, e, "model=tiny model.tiny_variant=flux-dev") from e
    _place([parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]], parts["vae"], device, dtype)
    log.info("loaded %s on %s (%s)", identity, device, str(dtype).replace("torch.", ""))
    return FluxModel(device=device, dtype=dtype, identity=identity, **parts)


def _guidance(value: float, model: Any) -> float:
    import math

    if not getattr(model, "guidance_embedded", False):
        raise ConfigError(f"model.guidance={value}: '{model.identity}' has no guidance input (guidance_embeds=false, "
                          "e.g. FLUX.1-schnell) — drop the setting")
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ConfigError(f"model.guidance={value} must be a finite number >= 0 — FLUX.1-dev's default is 3.5")
    return float(value)


def _listed_tokenizer(path: str, index: dict[str, Any], slot: str, kw: dict[str, Any]):
    """The tokenizer in ``slot`` by the class model_index.json names (ByT5Tokenizer in the tiny builds), else None."""
    entry = index.get(slot) if index else None
    if not entry or entry[0] != "transformers":
        return None
    import transformers

    cls = getattr(transformers, str(entry[1]), None)
    return None if cls is None else cls.from_pretrained(path, subfolder=slot, **kw)


def _assemble_mmdit(parts: dict[str, Any], device: torch.device, dtype: torch.dtype, identity: str) -> SD3Model:
    """:func:`_assemble` for SD 3."""
    _place([parts.get(n) for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")], parts["vae"],
           device, dtype)
    log.info("loaded %s on %s (%s)", identity, device, str(dtype).replace("torch.", ""))
    return SD3Model(device=device, dtype=dtype, identity=identity, **parts)


def _assemble(vae, text_encoder, tokenizer, unet, scheduler, device: torch.device, dtype: torch.dtype, identity: str,
              text_encoder_2=None, tokenizer_2=None) -> DiffusionModel:
    """Move the components to one device/dtype (the VAE in float32 where its config asks), eval, no grads."""
    _place([unet, text_encoder, text_encoder_2], vae, device, dtype)
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
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if getattr(pipe, "transformer", None) is not None and hasattr(pipe.transformer, "single_transformer_blocks"):
        missing = [name for name in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
                   if getattr(pipe, name, None) is None]
        if missing:
            raise ModelLoadError(f"{type(pipe).__name__} has a FLUX transformer but no {', '.join(missing)} — pass a "
                                 "FluxPipeline")
        dev = torch.device(device) if device is not None else next(pipe.transformer.parameters()).device
        torch_dtype = resolve_dtype(dtype, dev) if dtype is not None else next(pipe.transformer.parameters()).dtype
        name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
        parts = {k: getattr(pipe, k) for k in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                                "tokenizer_2")}
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        _place([parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]], parts["vae"], dev, torch_dtype)
        return FluxModel(device=dev, dtype=torch_dtype, identity=f"pipeline:{name}", **parts)
    if getattr(pipe, "transformer", None) is not None:  # StableDiffusion3Pipeline-like
        missing = [name for name in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
                   if getattr(pipe, name, None) is None]
        if missing:
            raise ModelLoadError(f"{type(pipe).__name__} has a transformer but no {', '.join(missing)} — pass a "
                                 "StableDiffusion3Pipeline (text_encoder_3 may be None)")
        dev = torch.device(device) if device is not None else next(pipe.transformer.parameters()).device
        torch_dtype = resolve_dtype(dtype, dev) if dtype is not None else next(pipe.transformer.parameters()).dtype
        name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or type(pipe).__name__
        parts = {k: getattr(pipe, k, None) for k in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                                      "tokenizer_2", "text_encoder_3", "tokenizer_3")}
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        return _assemble_mmdit(parts, dev, torch_dtype, f"pipeline:{name}")
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
