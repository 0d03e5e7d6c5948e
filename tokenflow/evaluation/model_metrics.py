"""The metrics computed by networks (``transformers``, by hub id or local folder, nothing downloaded when
``HF_HUB_OFFLINE=1``): CLIP text alignment and frame consistency, DINO structure distance and consistency.

``model: tiny`` builds random-weight models (:mod:`tokenflow.models.tiny_eval`) whose scores are labelled
MEANINGLESS. LPIPS is not offered: the ``lpips`` package (and torchmetrics' LPIPS) downloads torchvision backbone
weights at run time.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.evaluation.interface import VideoMetric
from tokenflow.evaluation.metrics import as_frames

MEANINGLESS = "MEANINGLESS (random-weight tiny test model): "


def _is_meaningless(model: str) -> bool:
    """``tiny`` or a folder built by :mod:`tokenflow.models.tiny_eval` (random weights)."""
    from tokenflow.models.tiny_eval import is_tiny_eval

    return model == "tiny" or is_tiny_eval(Path(model).expanduser())


def _resolve_model(model: str, cache_dir: str | None, tiny: Any) -> str:
    """Path or hub id to load ``model`` from; ``tiny`` (a folder builder) builds the random test model once."""
    if model == "tiny":
        from tokenflow.paths import default_cache_dir

        return str(tiny(cache_dir or default_cache_dir()))
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if model.startswith((".", "/", "~")):
        raise ModelLoadError(f"metric model folder '{model}' does not exist — check the path or use a hub id")
    return model


def _label(model: str, label: str | None, meaningless: bool) -> str:
    if label:
        return label
    if meaningless:
        return "tiny-random"
    return Path(model.rstrip("/")).name


def _load_error(kind: str, model: str, e: Exception) -> ModelLoadError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ModelLoadError(f"cannot load {kind} model '{model}': {first} — download it first while online (or set "
                          "HF_HUB_OFFLINE=0), point model= at a local folder, or use model=tiny for the offline test model")


class ModelMetric(VideoMetric):
    """A metric computed by a network loaded by hub id or folder (``config.model``), or ``tiny``: random
    weights built offline, whose scores are labelled meaningless. ``Config`` has ``model`` and ``label``."""

    def __init__(self, **config: Any) -> None:
        self.config = self.Config(**config)
        self._meaningless = _is_meaningless(self.config.model)
        self.label = _label(self.config.model, self.config.label, self._meaningless)

    @property
    def meaningless(self) -> bool:
        return self._meaningless


def _pooled(out: Any) -> torch.Tensor:
    """transformers 4.x returns the projected embedding, 5.x an output whose pooler_output holds it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _cosine_rows(e: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (n, D) float64 arrays; a row with itself gives exactly 1.0 (sqrt(s*s) == s in IEEE)."""
    return (e * f).sum(-1) / np.sqrt((e * e).sum(-1) * (f * f).sum(-1))


@dataclass
class ClipConfig:
    model: str = "openai/clip-vit-base-patch32"   # hub id, local folder, or "tiny" (random weights, meaningless)
    device: str = "auto"
    batch_size: int = 16
    cache_dir: Optional[str] = None               # where model=tiny is built (default: the library cache dir)
    label: Optional[str] = None                   # the key suffix after "@"; default: the model's name

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"metrics.clip.batch_size={self.batch_size} must be >= 1 — e.g. 16")


class ClipMetric(ModelMetric):
    """CLIP text alignment and frame consistency (``transformers`` CLIPModel, projected embeddings, fp32)."""

    name = "clip"
    Config = ClipConfig

    @property
    def definitions(self) -> dict[str, str]:
        pre = MEANINGLESS if self.meaningless else ""
        emb = f"projected CLIP image embeddings (get_image_features, the model's image processor) of {self.config.model}"
        return {f"{k}@{self.label}": pre + v for k, v in {
            "clip_text_alignment": (f"mean over frames of the cosine between the {emb} and the projected text embedding "
                                    "of the target prompt (x1, not x100; not logit-scaled)"),
            "clip_frame_consistency": f"mean over consecutive frame pairs (t, t+1) of the cosine of the {emb}",
            "clip_frame_consistency_first": f"mean over frames t >= 1 of the cosine of the {emb} of frame t and frame 0",
            "clip_frame_consistency_all_pairs": f"mean over all ordered pairs of distinct frames of the cosine of the {emb}",
        }.items()}

    @cached_property
    def _loaded(self) -> tuple[Any, Any, Any, torch.device]:
        from tokenflow.models.loading import resolve_device
        from tokenflow.models.tiny_eval import tiny_clip_folder

        device = resolve_device(self.config.device)
        path = _resolve_model(self.config.model, self.config.cache_dir, tiny_clip_folder)
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel  # slow import: after the checks
        try:
            model = CLIPModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise _load_error("CLIP", self.config.model, e) from e
        return model.to(device, torch.float32).eval().requires_grad_(False), tokenizer, processor, device

    @torch.no_grad()
    def image_embeddings(self, frames: Any) -> np.ndarray:
        """(N, P) float64 projected image embeddings of (N, H, W, 3) uint8 frames."""
        model, _, processor, device = self._loaded
        out = []
        for lo in range(0, len(frames), self.config.batch_size):
            batch = [np.ascontiguousarray(f) for f in frames[lo:lo + self.config.batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device, torch.float32)
            out.append(_pooled(model.get_image_features(pixel_values=pixels)).double().cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> np.ndarray:
        """(P,) float64 projected text embedding of ``prompt`` (truncated to the text model's length)."""
        model, tokenizer, _, device = self._loaded
        tokens = tokenizer([prompt], padding=True, truncation=True,
                           max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        return _pooled(model.get_text_features(**tokens.to(device))).double().cpu().numpy()[0]

    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        e = self.image_embeddings(as_frames(edited, "edited"))
        out: dict[str, float] = {}
        if prompt:
            t = np.broadcast_to(self.text_embedding(prompt), e.shape)
            out["clip_text_alignment"] = float(_cosine_rows(e, t).mean())
        if len(e) >= 2:
            n = len(e)
            i, j = np.nonzero(~np.eye(n, dtype=bool))
            out["clip_frame_consistency"] = float(_cosine_rows(e[1:], e[:-1]).mean())
            out["clip_frame_consistency_first"] = float(_cosine_rows(e[1:], np.broadcast_to(e[0], e[1:].shape)).mean())
            out["clip_frame_consistency_all_pairs"] = float(_cosine_rows(e[i], e[j]).mean())
        return {f"{k}@{self.label}": v for k, v in out.items()}


def key_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The key projection (nn.Linear) of every self-attention layer of a transformers ViT/Dinov2, in order.

    Found by name (``k_proj`` in transformers 5, ``attention.key`` in 4.x), not by a hard-coded path.
    """
    found = [m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (n.endswith("k_proj") or n.endswith("attention.key"))]
    expected = getattr(model.config, "num_hidden_layers", None)
    if not found or (expected is not None and len(found) != expected):
        raise ModelLoadError(f"{type(model).__name__} has {len(found)} key projections for {expected} layers — use a "
                             "ViT or Dinov2 model (e.g. facebook/dino-vitb8, facebook/dinov2-base)")
    return found


def self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """(B, T, T) cosine self-similarity of the tokens of (B, T, D) keys (CLS included)."""
    k = torch.nn.functional.normalize(keys.double(), dim=-1)
    return k @ k.transpose(1, 2)


@dataclass
class DinoConfig:
    model: str = "facebook/dino-vitb8"   # ViT (DINO v1) or Dinov2 hub id / folder, or "tiny" (meaningless)
    layer: int = -1                      # self-attention layer whose keys are compared (-1: the last, as FiVE)
    size: int = 224                      # short side of the frames fed to the model (rounded down to the patch)
    device: str = "auto"
    batch_size: int = 8
    cache_dir: Optional[str] = None
    label: Optional[str] = None

    def __post_init__(self) -> None:
        if self.size < 1 or self.batch_size < 1:
            raise ConfigError(f"metrics.dino.size={self.size} / batch_size={self.batch_size} must be >= 1 — e.g. 224 / 8")


class DinoStructureMetric(ModelMetric):
    """Structure distance (DINO key self-similarity, Splice/PnP/FiVE-Bench) and DINO frame consistency."""

    name = "dino"
    Config = DinoConfig

    @property
    def definitions(self) -> dict[str, str]:
        pre = MEANINGLESS if self.meaningless else ""
        feed = (f"{self.config.model} on frames resized (bicubic, antialiased) to short side {self.config.size} rounded down "
                "to the patch size, /255, normalised with the model's image mean/std")
        return {
            f"structure_distance@{self.label}": pre + (
                f"mean over frames of the mean squared difference between the token self-similarity matrices (cosine, "
                f"CLS included) of the self-attention keys of layer {self.config.layer} (-1: the last) of source and edited "
                f"frame; {feed}"),
            f"dino_consistency@{self.label}": pre + (
                f"mean over consecutive edited frame pairs of max(0, cosine) of the final layer-normed CLS tokens; {feed}"),
        }

    @cached_property
    def _loaded(self) -> tuple[Any, torch.nn.Module, torch.Tensor, torch.Tensor, torch.device]:
        from tokenflow.models.loading import resolve_device
        from tokenflow.models.tiny_eval import tiny_dino_folder

        device = resolve_device(self.config.device)
        path = _resolve_model(self.config.model, self.config.cache_dir, tiny_dino_folder)
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, ViTModel  # slow import: after the checks
        try:
            cfg = AutoConfig.from_pretrained(path)
            if cfg.model_type == "vit":  # DINO v1 checkpoints have no trained pooler
                model = ViTModel.from_pretrained(path, add_pooling_layer=False)
            else:
                model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise _load_error("DINO", self.config.model, e) from e
        try:
            processor = AutoImageProcessor.from_pretrained(path)
            mean, std = processor.image_mean, processor.image_std
        except (OSError, ValueError, AttributeError):
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, what DINO was trained with
        layers = key_projections(model)
        if not -len(layers) <= self.config.layer < len(layers):
            raise ConfigError(f"metrics.dino.layer={self.config.layer} does not exist — this model has layers "
                              f"0-{len(layers) - 1} (or -1 for the last)")
        to = dict(device=device, dtype=torch.float32)
        return (model.to(device, torch.float32).eval().requires_grad_(False), layers[self.config.layer],
                torch.tensor(mean, **to).view(1, 3, 1, 1), torch.tensor(std, **to).view(1, 3, 1, 1), device)

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """(N, 3, h, w) normalised model input of (N, H, W, 3) uint8 frames."""
        model, _, mean, std, device = self._loaded
        patch = model.config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else int(patch)
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        scale = self.config.size / min(h, w)
        size = (max(patch, int(round(h * scale)) // patch * patch), max(patch, int(round(w * scale)) // patch * patch))
        if size != (h, w):
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 1) - mean) / std

    @torch.no_grad()
    def features(self, frames: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (N, T, D) at the configured layer and final layer-normed CLS tokens (N, D) of the frames."""
        model, key_proj, _, _, _ = self._loaded
        frames = as_frames(frames)
        interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        keys, cls = [], []
        captured: list[torch.Tensor] = []
        handle = key_proj.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            for lo in range(0, len(frames), self.config.batch_size):
                captured.clear()
                px = self.pixels(frames[lo:lo + self.config.batch_size])
                out = model(pixel_values=px, **({"interpolate_pos_encoding": True} if interpolate else {}))
                keys.append(captured[-1].double().cpu())
                cls.append(out.last_hidden_state[:, 0].double().cpu())
        finally:
            handle.remove()
        return torch.cat(keys), torch.cat(cls)

    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        k_edit, cls = self.features(edited)
        k_src, _ = self.features(source)
        dist = ((self_similarity(k_edit) - self_similarity(k_src)) ** 2).mean(dim=(1, 2))
        out = {f"structure_distance@{self.label}": float(dist.mean())}
        if len(cls) >= 2:
            c = torch.nn.functional.normalize(cls, dim=-1)
            out[f"dino_consistency@{self.label}"] = float((c[1:] * c[:-1]).sum(-1).clamp(min=0).mean())
        return out
