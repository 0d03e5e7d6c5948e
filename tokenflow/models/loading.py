"""Load a Stable-Diffusion-family model (VAE, text encoder, tokenizer, UNet, DDIM scheduler).

One code path for a hub id, a local folder and the offline ``tiny`` model. Device and dtype are
resolved here and nowhere else (``auto``: CUDA + fp16 when available, else CPU + fp32).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tokenflow.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available else ``cpu``; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


@dataclass
class DiffusionModel:
    """The components TokenFlow needs, on one device and dtype.

    ``identity`` names where the weights came from; ``fingerprint`` hashes configs and a sample of
    weights so caches keyed on it never mix two different models.
    """

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    identity: str
    fingerprint: str = field(default="")
    vae_batch: int = 8

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = model_fingerprint(self)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_text(self, prompts: str | list[str]) -> Tensor:
        """Prompts → text embeddings (n, 77, D) on the model's device and dtype."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        out = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return out.to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [-1, 1] → latents (N, 4, H/8, W/8): posterior mean × scaling factor."""
        latents = []
        for chunk in images.split(self.vae_batch):
            posterior = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            latents.append(posterior.mean * self.latent_scale)
        return torch.cat(latents)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents (N, 4, h, w) → images (N, 3, 8h, 8w) in [-1, 1], float32 on CPU."""
        images = []
        for chunk in latents.split(self.vae_batch):
            out = self.vae.decode(chunk.to(self.device, self.dtype) / self.latent_scale).sample
            images.append(out.float().clamp(-1, 1).cpu())
        return torch.cat(images)


def model_fingerprint(model: DiffusionModel) -> str:
    """Hash of every component's config plus a sample of UNet/VAE weights and the dtype."""
    h = hashlib.sha256()
    for part in (model.unet, model.vae, model.text_encoder):
        cfg = part.config.to_dict() if hasattr(part.config, "to_dict") else dict(part.config)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps(dict(model.scheduler.config), sort_keys=True, default=str).encode())
    for module in (model.unet.conv_in, model.unet.conv_out, model.vae.encoder.conv_in):
        h.update(module.weight.detach().float().cpu().numpy().tobytes())
    h.update(str(model.dtype).encode())
    return h.hexdigest()[:20]


def load_model(source: str, device: str = "auto", dtype: str = "auto", revision: str | None = None,
               variant: str | None = None, local_files_only: bool = False, cache_dir: str | None = None,
               tiny_seed: int = 0) -> DiffusionModel:
    """Load SD components from a hub id, a local folder, or ``tiny`` (built offline, cached).

    ``cache_dir`` is where the tiny model is built (default: the library's user cache dir).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    identity = source
    if source == "tiny":
        from tokenflow.paths import default_cache_dir
        from tokenflow.models.tiny import TinyModelSpec, tiny_model_folder

        spec = TinyModelSpec(seed=tiny_seed)
        path = str(tiny_model_folder(cache_dir or default_cache_dir(), spec))
        identity = f"tiny:{spec.key()}"
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
    kw = dict(revision=revision, local_files_only=local_files_only)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype, variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype, variant=variant, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch_dtype, variant=variant, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot load model '{source}': {first[:200]} — check the id/path, download it first while online "
            "(or set HF_HUB_OFFLINE=0), or use model=tiny for the offline test model") from e
    for part in (unet, vae, text_encoder):
        part.to(dev).eval().requires_grad_(False)
    log.info("loaded %s on %s (%s)", identity, dev, str(torch_dtype).replace("torch.", ""))
    return DiffusionModel(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                          device=dev, dtype=torch_dtype, identity=identity)
