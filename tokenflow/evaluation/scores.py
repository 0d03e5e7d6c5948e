"""Video metrics behind one small interface, selected by config, and recomputed for finished runs.

A :class:`VideoMetric` computes ``{key: value}`` for an edited clip against its source (prompt and
object masks optional) and says in :attr:`~VideoMetric.definitions` exactly what each key means;
keys carry the backend that produced them (``warp_error@opencv-farneback``,
``clip_text_alignment@clip-vit-base-patch32``) so numbers of different definitions never share a
column. A :class:`MetricSuite` is a named set of them built from ``conf/metrics/*.yaml``
(``_target_`` nodes); :func:`recompute` re-scores a run directory without editing again, and
:func:`main` is the ``tokenflow-metrics`` console script.

Weight-free: warp error (OpenCV flow), point-track motion fidelity (OpenCV Lucas-Kanade), background
PSNR/SSIM outside object masks. Model-based (``transformers``, by hub id or local folder, nothing
downloaded when ``HF_HUB_OFFLINE=1``): CLIP text alignment and frame consistency, DINO self-similarity
structure distance and DINO frame consistency. ``model: tiny`` builds random-weight models
(:mod:`tokenflow.models.tiny_eval`) whose scores are labelled MEANINGLESS. LPIPS is not offered: the
``lpips`` package (and torchmetrics' LPIPS) downloads torchvision backbone weights at run time.
Which benchmark each key matches, and how it differs, is in :data:`BENCHMARKS`; the numbers the
pipeline itself measures (timings, UNet evaluations, memory, reconstruction PSNR) are listed in
:data:`PIPELINE_METRICS` and not recomputed here.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tokenflow.core.optical_flow import FlowMethod
from tokenflow.errors import ConfigError, ModelLoadError, TokenFlowError, VideoError, library_error
from tokenflow.evaluation.metrics import (TRACK_METHOD, as_frames, as_masks, masked_psnr, masked_ssim, track_error,
                                          warp_error)
from tokenflow.options import choice
from tokenflow.atomic import write_json

MEANINGLESS = "MEANINGLESS (random-weight tiny test model): "
DEFAULT_SUITE = "default"

# --- what the pipeline measures itself (listed, never recomputed here) ---------------------------

PIPELINE_METRICS: dict[str, str] = {
    "unet_evaluations": "image-UNet evaluations in the edit (batch elements summed over calls), inversion excluded",
    "inversion_s": "wall seconds to obtain the inversion (encode + DDIM inversion, or the cache load on a hit)",
    "editing_s": "wall seconds of the denoising loop (keyframe passes, propagation, DDIM steps)",
    "decoding_s": "wall seconds to decode the edited latents with the VAE",
    "reconstruction_s": "wall seconds to DDIM-sample the inversion back and decode it",
    "total_s": "wall seconds of the job, from reading the config to writing the outputs",
    "inversion_cache_hit": "1 when the inversion was loaded from the cache, 0 when computed",
    "peak_rss_mb": "peak resident memory of the process (getrusage ru_maxrss), MiB, model loading included",
    "peak_cuda_mb": "peak CUDA memory allocated by torch (torch.cuda.max_memory_allocated), MiB",
    "estimated_peak_rss_mb": "the preflight estimate of peak resident memory (tokenflow.core.memory), MiB",
    "estimated_peak_cuda_mb": "the preflight estimate of peak CUDA memory (tokenflow.core.memory), MiB",
    "psnr_reconstruction_vs_input": "PSNR (dB, uint8) of the decoded DDIM reconstruction against the input frames",
    "psnr_vae_only_vs_input": "PSNR (dB, uint8) of the VAE-only round trip (encode, decode) against the input frames",
    "psnr_reconstruction_vs_vae_only": "PSNR (dB, uint8) of the DDIM reconstruction against the VAE-only round trip",
    "latent_relative_error": "||reconstructed z0 - encoded z0|| / ||encoded z0|| over all frames",
}


def pipeline_definitions(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Definitions of the keys of ``metrics`` that the pipeline measures itself (see :data:`PIPELINE_METRICS`)."""
    return {k: PIPELINE_METRICS[k] for k in metrics if k in PIPELINE_METRICS}


# --- which benchmark each key matches -------------------------------------------------------------
# key family (the key before "@") -> what each benchmark calls it and whether the numbers are comparable.
# Sources were read at the commits listed in /work/shared/docs/field.md, plus
# Harvard-AI-and-Robotics-Lab/FiVE-Bench evaluation/metrics_calculator.py @ 2825ec1.

BENCHMARKS: dict[str, list[dict[str, str]]] = {
    "warp_error": [
        {"benchmark": "TokenFlow (Geyer et al., ICLR'24), Table 1", "name": "warp error", "comparable": "no",
         "difference": "RAFT flow; the evaluation script is unreleased (omerbt/TokenFlow#35, #49)",
         "source": "paper §5; field.md §2a"},
        {"benchmark": "VidToMe (CVPR'24), Table 1", "name": "Warp Err.", "comparable": "no",
         "difference": "RAFT flow", "source": "paper"},
        {"benchmark": "StreamV2V (ICLR'25), Table 1", "name": "warp error", "comparable": "no",
         "difference": "RAFT; mean |diff| of uint8 frames (wraps modulo 256), other occlusion mask",
         "source": "Jeff-LiangF/streamv2v tools/warp_error.py"},
    ],
    "clip_text_alignment": [
        {"benchmark": "TokenFlow, Table 1", "name": "CLIP score (edit fidelity)", "comparable": "with the same CLIP",
         "difference": "model not stated in the released code", "source": "paper §5"},
        {"benchmark": "V2VBench", "name": "Frames Text Alignment", "comparable": "x100 and model=openai/clip-vit-large-patch14",
         "difference": "reports logit_scale (100) x cosine", "source": "wenhao728/awesome-diffusion-v2v v2vbench/clip_text_alignment.py"},
        {"benchmark": "FiVE-Bench", "name": "CLIP score", "comparable": "no",
         "difference": "torchmetrics CLIPScore = 100 max(cos, 0), ViT-L/14, optionally on the masked edit region",
         "source": "FiVE-Bench evaluation/metrics_calculator.py"},
        {"benchmark": "RAVE / VidToMe", "name": "CLIP-T / Text CLIP", "comparable": "with ViT-B/32",
         "difference": "openai clip package preprocessing", "source": "RehgLab/RAVE evaluation_uncleaned/eval_utils.py"},
    ],
    "clip_frame_consistency": [
        {"benchmark": "FateZero / Rerender / FRESCO / Fairy", "name": "Tem-Con", "comparable": "with ViT-B/32",
         "difference": "openai clip package preprocessing",
         "source": "ChenyangQiQi/FateZero CLIP/frame_acc_tem_con.py"},
        {"benchmark": "StreamV2V / FlowVid / TokenFlow", "name": "CLIP consistency", "comparable": "with ViT-B/32",
         "difference": "none known (HF openai/clip-vit-base-patch32, projected embeddings)",
         "source": "Jeff-LiangF/streamv2v tools/clip_score.py"},
        {"benchmark": "V2VBench", "name": "CLIP consistency", "comparable": "no",
         "difference": "unprojected pooler_output of CLIPVisionModel, clamped at 0, ViT-L/14",
         "source": "v2vbench/clip_consistency.py"},
    ],
    "clip_frame_consistency_all_pairs": [
        {"benchmark": "RAVE (CVPR'24)", "name": "CLIP-F", "comparable": "with ViT-B/32",
         "difference": "openai clip package preprocessing", "source": "RehgLab/RAVE evaluation_uncleaned/eval_utils.py"},
    ],
    "clip_frame_consistency_first": [
        {"benchmark": "none", "name": "-", "comparable": "-",
         "difference": "a diagnostic of drift away from the first frame", "source": "-"},
    ],
    "structure_distance": [
        {"benchmark": "FiVE-Bench (ICCV'25) / PIE-Bench", "name": "Structure Distance", "comparable": "no",
         "difference": "same construction (DINO ViT-B/8 last-layer keys, cosine self-similarity incl. CLS, MSE); "
                       "FiVE resizes with torchvision Resize(224, max_size=480) and feeds 0-255 pixels to the "
                       "ImageNet normalisation (no /255); per frame, not per video",
         "source": "FiVE-Bench evaluation/metrics_calculator.py (LossG.calculate_global_ssim_loss)"},
    ],
    "dino_consistency": [
        {"benchmark": "V2VBench", "name": "DINO consistency", "comparable": "with facebook/dinov2-base, nearly",
         "difference": "V2VBench resizes to 256 and centre-crops 224 (BitImageProcessor); we resize the short side "
                       "to `size` without cropping", "source": "v2vbench/dino_consistency.py"},
    ],
    "track_epe": [
        {"benchmark": "FiVE-Bench", "name": "Motion Fidelity Score", "comparable": "no",
         "difference": "CoTracker tracks on a grid, cosine of displacement directions; ours: OpenCV LK tracks of "
                       "Shi-Tomasi corners, endpoint distance in pixels (lower is better)",
         "source": "FiVE-Bench evaluation/metrics_calculator.py (MotionFidelityScore)"},
        {"benchmark": "V2VBench", "name": "Motion Alignment", "comparable": "no",
         "difference": "-EPE between GMFlow flows of edit and source (dense flow, not tracks)",
         "source": "v2vbench/motion_alignment.py"},
    ],
    "background_psnr": [
        {"benchmark": "FiVE-Bench", "name": "PSNR (unedited part)", "comparable": "no",
         "difference": "FiVE zeroes the object pixels and takes PSNR over the whole frame (zeros count as "
                       "perfect pixels, so its values are higher); ours: MSE over background pixels only",
         "source": "FiVE-Bench evaluation/evaluate.py (psnr_unedit_part)"},
    ],
    "background_ssim": [
        {"benchmark": "FiVE-Bench", "name": "SSIM (unedited part)", "comparable": "no",
         "difference": "torchmetrics SSIM over the whole frame with object pixels zeroed; ours: mean local SSIM "
                       "over background pixels whose 11x11 window avoids the object",
         "source": "FiVE-Bench evaluation/evaluate.py (ssim_unedit_part)"},
    ],
}


# --- the interface --------------------------------------------------------------------------------


class VideoMetric(ABC):
    """One family of video metrics. ``compute`` returns ``{key: value}`` (a key may be left out when it
    cannot be measured, e.g. temporal metrics of a one-frame clip, background metrics without masks);
    :attr:`definitions` maps every key it can write to its exact definition (written to metrics.json)."""

    name: str = ""  # short family name, the key of this metric in a MetricSuite config

    @property
    def meaningless(self) -> bool:
        """True when the values only exercise the plumbing (random-weight test models)."""
        return False

    @property
    @abstractmethod
    def definitions(self) -> dict[str, str]:
        """Every key :meth:`compute` can return, with its exact definition."""

    @abstractmethod
    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        """Score ``edited`` against ``source``: (N, H, W, 3) uint8 frames (or Videos) of the same shape.

        ``prompt``: the target prompt; ``masks``: object masks (N, H, W) or (H, W), True = the edited object.
        """


@dataclass
class Scores:
    """The result of :meth:`MetricSuite.evaluate`: values, their definitions and which are meaningless."""

    values: dict[str, float]
    definitions: dict[str, str]
    meaningless: list[str] = field(default_factory=list)
    withheld: str | None = None  # why no value is reported (a degenerate edit, e.g. every frame one flat colour)

    def merge_into(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add these scores to a metrics.json record in place (``metrics``, ``definitions`` and, when any are
        meaningless, ``info.meaningless_metrics``); returns the record."""
        record.setdefault("metrics", {}).update(self.values)
        record.setdefault("definitions", {}).update(self.definitions)
        if self.meaningless or self.withheld:
            info = record.setdefault("info", {}) or {}
            if self.meaningless:
                info["meaningless_metrics"] = sorted(set(info.get("meaningless_metrics", [])) | set(self.meaningless))
            if self.withheld:
                info["metrics_withheld"] = self.withheld
            record["info"] = info
        return record


class MetricSuite:
    """A named set of metrics (the ``metrics`` config group): ``MetricSuite(warp=WarpErrorMetric(), ...)``."""

    def __init__(self, **metrics: VideoMetric) -> None:
        bad = [k for k, m in metrics.items() if not isinstance(m, VideoMetric)]
        if bad:
            raise ConfigError(f"metrics.{bad[0]} is a {type(metrics[bad[0]]).__name__}, not a VideoMetric — give it a "
                              "_target_ such as tokenflow.evaluation.scores.WarpErrorMetric")
        self.metrics: dict[str, VideoMetric] = dict(metrics)

    def definitions(self) -> dict[str, str]:
        return {k: v for m in self.metrics.values() for k, v in m.definitions.items()}

    def evaluate(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> Scores:
        """Run every metric on the same frames; see :meth:`VideoMetric.compute` for the arguments."""
        ed, src = as_frames(edited, "edited"), as_frames(source, "source")
        if ed.shape != src.shape:
            raise VideoError(f"edited frames {ed.shape} and source frames {src.shape} differ in shape — score the edit "
                             "at the source's size and length")
        m = None if masks is None else as_masks(masks, src.shape[0], src.shape[1:3])
        if self.metrics and flat_frames(ed):  # consistency metrics would call it perfect: report nothing
            return Scores({}, {}, withheld="every edited frame is a single flat colour (a degenerate edit): no metric "
                                           "is meaningful on it")
        values: dict[str, float] = {}
        definitions: dict[str, str] = {}
        meaningless: list[str] = []
        for metric in self.metrics.values():
            out = metric.compute(ed, src, prompt, m)
            values.update({k: float(v) for k, v in out.items()})
            definitions.update({k: metric.definitions[k] for k in out})
            if metric.meaningless:
                meaningless += list(out)
        return Scores(values, definitions, meaningless)


def flat_frames(frames: np.ndarray) -> bool:
    """Whether every frame of (N, H, W, 3) uint8 ``frames`` is one flat colour (e.g. the black frames of a NaN edit)."""
    pixels = frames.reshape(frames.shape[0], -1, frames.shape[-1])
    return bool((pixels.max(axis=1) == pixels.min(axis=1)).all())


# --- weight-free metrics --------------------------------------------------------------------------


@dataclass
class WarpConfig:
    method: FlowMethod = FlowMethod.farneback   # OpenCV flow estimated on the source video

    def __post_init__(self) -> None:
        self.method = choice(FlowMethod, self.method, "metrics.warp.method")


class WarpErrorMetric(VideoMetric):
    """Flow-warping error (Lai et al. 2018) with OpenCV flow on the source; wraps :func:`metrics.warp_error`."""

    name = "warp"
    Config = WarpConfig

    def __init__(self, **config: Any) -> None:
        self.config = WarpConfig(**config)

    @property
    def definitions(self) -> dict[str, str]:
        m = self.config.method.value
        return {
            f"warp_error@opencv-{m}": (
                f"mean over consecutive pairs (t, t+1) of the MSE (float RGB in [0, 1]) between edited frame t+1 and "
                f"edited frame t warped onto it (cv2.remap, bilinear) with the backward flow t+1->t estimated on the "
                f"SOURCE video by OpenCV {m}; pixels failing the UnFlow forward-backward check (alpha=0.01, beta=0.5) "
                "or sampling outside the frame are left out. Not comparable with RAFT-based figures"),
            f"warp_occluded_fraction@opencv-{m}": f"mean over pairs of the share of pixels left out of warp_error@opencv-{m}",
        }

    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        if as_frames(source).shape[0] < 2:
            return {}
        m = self.config.method.value
        w = warp_error(edited, source, m)
        return {f"warp_error@opencv-{m}": w["warp_error"], f"warp_occluded_fraction@opencv-{m}": w["occluded_fraction"]}


@dataclass
class TrackConfig:
    max_points: int = 400   # Shi-Tomasi corners of source frame 0 to track

    def __post_init__(self) -> None:
        if self.max_points < 1:
            raise ConfigError(f"metrics.tracks.max_points={self.max_points} must be >= 1 — e.g. 400")


class TrackMetric(VideoMetric):
    """Motion fidelity from OpenCV Lucas-Kanade point tracks; wraps :func:`metrics.track_error`."""

    name = "tracks"
    Config = TrackConfig

    def __init__(self, **config: Any) -> None:
        self.config = TrackConfig(**config)

    @property
    def definitions(self) -> dict[str, str]:
        t = TRACK_METHOD
        return {
            f"track_epe@{t}": (
                f"mean endpoint distance in pixels between where up to {self.config.max_points} Shi-Tomasi corners of "
                "source frame 0 are tracked in the source and, from the same start points, in the edit (OpenCV "
                "pyramidal Lucas-Kanade 21x21, 3 levels, frame to frame, lost for good after a forward-backward error "
                "> 1 px or leaving the frame), over every (point, frame >= 1) tracked in both; lower = motion kept"),
            f"track_kept_fraction@{t}": "share of the source's tracked (point, frame >= 1) pairs that the edit also tracks",
        }

    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        if as_frames(source).shape[0] < 2:
            return {}
        r = track_error(edited, source, self.config.max_points)
        return {f"track_epe@{TRACK_METHOD}": r["track_epe"], f"track_kept_fraction@{TRACK_METHOD}": r["track_kept_fraction"]}


@dataclass
class BackgroundConfig:
    pass


class BackgroundMetric(VideoMetric):
    """Background preservation outside the object masks: PSNR and SSIM against the source (needs masks)."""

    name = "background"
    Config = BackgroundConfig

    def __init__(self, **config: Any) -> None:
        self.config = BackgroundConfig(**config)

    @property
    def definitions(self) -> dict[str, str]:
        return {
            "background_psnr": ("mean over frames of 10 log10(255^2 / MSE), the MSE over the RGB values of the pixels "
                                "outside the object mask (edit vs source, uint8 scale); frames with no background or no "
                                "difference are left out"),
            "background_ssim": ("mean over frames of the mean local SSIM (Gaussian 11x11 window, sigma 1.5, K1=0.01, "
                                "K2=0.03, channels averaged; skimage's definition) over the pixels whose whole window lies "
                                "inside the frame and outside the object mask"),
        }

    def compute(self, edited: Any, source: Any, prompt: str = "", masks: Any = None) -> dict[str, float]:
        if masks is None:
            return {}
        src = as_frames(source)
        m = as_masks(masks, src.shape[0], src.shape[1:3])
        return {"background_psnr": masked_psnr(edited, src, ~m), "background_ssim": masked_ssim(edited, src, m)}


# --- model-based metrics --------------------------------------------------------------------------


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


# --- suites from config ---------------------------------------------------------------------------


#: The library's metrics by family name (the keys of ``conf/metrics/*.yaml``). A received run folder's
#: ``metrics`` node is rebuilt from these by name (:func:`suite_from_data`), never by instantiating its ``_target_``s.
METRIC_CLASSES: dict[str, type[VideoMetric]] = {cls.name: cls for cls in (
    WarpErrorMetric, TrackMetric, BackgroundMetric, ClipMetric, DinoStructureMetric)}
_SUITE_TARGET = f"{MetricSuite.__module__}.{MetricSuite.__qualname__}"
_CONTEXT_KEYS = ("device", "cache_dir")  # the only interpolations a shipped metrics config holds


def suite_from_data(node: Mapping[str, Any], context: Mapping[str, Any] | None = None,
                    where: str = "metrics") -> MetricSuite:
    """A :class:`MetricSuite` from a metrics node read from a file that is data (a run folder's config.yaml).

    Each entry must name one of :data:`METRIC_CLASSES` by its ``_target_`` (the dotted path the library writes)
    and hold plain settings (numbers, strings, booleans, lists of them); the class is looked up in the
    registry and built with those settings, checked against its ``Config``. ``${device}`` and
    ``${cache_dir}`` are filled from ``context``; any other interpolation, an unknown ``_target_`` or a
    nested node is refused in one line naming the key, before anything is built.
    """
    context = {"device": "auto", "cache_dir": None, **(context or {})}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where} is {type(node).__name__}, not a mapping of metrics — rescore with --metrics "
                          "<name or file>")
    known = {f"{c.__module__}.{c.__qualname__}": c for c in METRIC_CLASSES.values()}
    metrics: dict[str, VideoMetric] = {}
    plans = []
    for name, sub in node.items():
        if name == "_target_":
            if sub != _SUITE_TARGET:
                raise ConfigError(f"{where}._target_={sub!r} is not {_SUITE_TARGET} — a metrics node from a run folder "
                                  "is data: rescore with --metrics <name or file> to choose the metrics")
            continue
        target = sub.get("_target_") if isinstance(sub, Mapping) else None
        if target not in known:
            raise ConfigError(f"{where}.{name} names {target!r}, not one of the library's metrics "
                              f"({', '.join(sorted(known))}) — rescore with --metrics <name or file>")
        settings = {k: _plain_setting(v, f"{where}.{name}.{k}", context) for k, v in sub.items() if k != "_target_"}
        plans.append((name, known[target], settings))
    for name, cls, settings in plans:
        _check_metric_settings(f"{where}.{name}", cls, settings)
        metrics[name] = cls(**settings)
    return MetricSuite(**metrics)


def _check_metric_settings(key: str, cls: type, settings: Mapping[str, Any]) -> None:
    """Refuse, in one line, a setting that ``cls``'s ``Config`` dataclass does not declare (none: no check)."""
    schema = getattr(cls, "Config", None)
    if schema is not None and is_dataclass(schema):
        known = sorted(f.name for f in fields(schema))
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ConfigError(f"{key} has no setting {unknown[0]!r} — valid settings: {known}")


def _plain_setting(value: Any, key: str, context: Mapping[str, Any]) -> Any:
    """``value`` if it is plain data (``${device}``/``${cache_dir}`` filled from ``context``); else ConfigError."""
    if isinstance(value, list):
        return [_plain_setting(v, f"{key}[{i}]", context) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        name = value[2:-1] if value.startswith("${") and value.endswith("}") else None
        if name in _CONTEXT_KEYS:
            return context.get(name)
        raise ConfigError(f"{key}={value!r} is an interpolation — a run folder's config is data; rescore with "
                          "--metrics <name or file> or set the value with KEY=VALUE")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{key} is a {type(value).__name__}, not a plain setting — a run folder's config is data; "
                      "rescore with --metrics <name or file>")



def suite_node(spec: str | Mapping | Any) -> Any:
    """The config node of a suite: an option of ``conf/metrics`` (``default``, ``full``, ``tiny``, ``none``), a
    YAML file, or a node (dict / DictConfig) as given."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, (Mapping, DictConfig)):
        return OmegaConf.create(spec) if not isinstance(spec, DictConfig) else spec
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        packaged = resources.files("tokenflow.conf") / "metrics" / f"{spec}.yaml"
        if not packaged.is_file():
            options = sorted(p.name[:-5] for p in (resources.files("tokenflow.conf") / "metrics").iterdir()
                             if p.name.endswith(".yaml"))
            raise ConfigError(f"metrics={spec!r} is neither a YAML file nor one of {', '.join(options)} — pick one")
        return OmegaConf.create(packaged.read_text())
    return OmegaConf.load(path)


def build_suite(spec: str | Mapping | Any = DEFAULT_SUITE, overrides: Sequence[str] = (),
                context: Mapping[str, Any] | None = None) -> MetricSuite:
    """A :class:`MetricSuite` from :func:`suite_node` ``spec`` plus Hydra-style ``overrides`` (``clip.model=/x``,
    ``+warp.x=1``, ``~tracks``).

    Interpolations such as ``${device}`` resolve against ``context`` (default: device=auto, cache_dir=None),
    as they resolve against the run config under Hydra. Each metric's keys are checked against its Config.
    """
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    node = _apply_overrides(suite_node(spec), overrides)
    root = OmegaConf.create({"device": "auto", "cache_dir": None, **(context or {})})
    root.metrics = node
    resolved = OmegaConf.to_container(root.metrics, resolve=True)
    for name, sub in resolved.items():
        if name == "_target_":
            continue
        if isinstance(sub, dict) and "_target_" in sub:
            _check_metric_settings(f"metrics.{name}", get_class(sub["_target_"]),
                                   {k: v for k, v in sub.items() if k != "_target_"})
    try:
        suite = instantiate(resolved)
    except Exception as e:  # hydra wraps constructor errors; surface ours unwrapped
        ours = library_error(e)
        if ours is not None:
            raise ours from None
        raise
    if not isinstance(suite, MetricSuite):
        raise ConfigError(f"metrics config builds a {type(suite).__name__} — its _target_ must be "
                          "tokenflow.evaluation.scores.MetricSuite")
    return suite


# --- recompute for a run directory ----------------------------------------------------------------


def load_masks(path: str | Path, n: int, hw: tuple[int, int]) -> np.ndarray:
    """(n, H, W) bool object masks from a folder of images or a video (nonzero / > 127 gray = object), resized
    to ``hw`` (nearest) and cut to the first ``n`` frames."""
    import cv2

    from tokenflow.evaluation.summary import read_native

    frames = read_native(path).frames
    if len(frames) < n:
        raise VideoError(f"masks '{path}' have {len(frames)} frames, the video {n} — give one mask per frame")
    out = np.stack([cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
                    for f in frames[:n]])
    return out > 127


def recompute(run_dir: str | Path, metrics: MetricSuite | str | Mapping | None = None, masks: Any = None,
              prompt: str | None = None, overrides: Sequence[str] = (), device: str | None = None) -> dict[str, Any]:
    """Score a finished run again (no editing) and merge the values into its metrics.json (atomically).

    Reads ``frames/`` (lossless PNGs) or else ``edited.mp4`` / ``reconstruction.mp4`` as the edit and
    ``input.mp4`` as the source (H.264: warp errors move by ~1e-4 against in-run values); ``prompt``
    defaults to config.yaml's; ``masks``: an array or a path (folder of images / video). ``metrics``: a
    suite, a suite spec for :func:`build_suite`, or None for the run's own ``metrics`` config node (else
    ``default``). Returns the updated metrics.json record.
    """
    from omegaconf import OmegaConf

    from tokenflow.evaluation.summary import load_record, read_native

    run = Path(run_dir)
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml")) if (run / "config.yaml").is_file() else {}
    record = load_record(run)
    if record.get("status") == "failed":
        raise ConfigError(f"run '{run}' failed ({record.get('error')}) — there is no output to score")
    if record.get("status") == "missing":  # outputs are published on success only: the run did finish
        record.update(status="ok", error=None)
    edited_path = next((p for p in (run / "frames", run / "edited.mp4", run / "reconstruction.mp4")
                        if p.is_file() or (p.is_dir() and any(p.glob("*.png")))), None)
    if edited_path is None or not (run / "input.mp4").is_file():
        raise VideoError(f"run '{run}' has no frames/ or edited.mp4 and input.mp4 — point at a finished run directory")
    source, edited = read_native(run / "input.mp4"), read_native(edited_path)
    if not isinstance(metrics, MetricSuite):
        context = {"device": device or cfg.get("device") or "auto", "cache_dir": cfg.get("cache_dir")}
        if metrics is None and cfg.get("metrics") is not None:  # the run's own: data, rebuilt by name
            metrics = suite_from_data(_with_overrides(cfg["metrics"], overrides), context, f"{run}/config.yaml: metrics")
        else:  # what the user named (an option of conf/metrics or a YAML file of theirs)
            metrics = build_suite(metrics if metrics is not None else DEFAULT_SUITE, overrides, context)
    if masks is not None and not isinstance(masks, np.ndarray):
        masks = load_masks(masks, source.n_frames, (source.height, source.width))
    text = cfg.get("prompt", "") if prompt is None else prompt
    scores = metrics.evaluate(edited, source, text or "", masks)
    scores.merge_into(record)
    record["info"]["recomputed_metrics"] = list(scores.values)
    record["info"]["metrics_recomputed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(run / "metrics.json", record)
    return record


def _apply_overrides(node: Any, overrides: Sequence[str]) -> Any:
    """``node`` (a DictConfig) with Hydra-style ``overrides`` applied: ``key=value``, ``+key=value``, ``~key``."""
    from omegaconf import OmegaConf

    for item in overrides:
        if item.startswith("~"):
            parent, _, leaf = item[1:].partition("=")[0].rpartition(".")
            target = OmegaConf.select(node, parent) if parent else node
            if target is None or leaf not in target:
                raise ConfigError(f"cannot remove {item[1:]!r}: the metrics config has no such key")
            target.pop(leaf)
        else:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist([item.lstrip("+")]))
    return node


def _with_overrides(node: Any, overrides: Sequence[str]) -> Any:
    """A plain metrics node with ``overrides`` applied (:func:`_apply_overrides`), unresolved."""
    from omegaconf import OmegaConf

    if not overrides:
        return node
    return OmegaConf.to_container(_apply_overrides(OmegaConf.create(node), overrides), resolve=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``tokenflow-metrics RUN_DIR... [--metrics NAME|FILE] [--masks PATH] [--prompt TEXT] [KEY=VALUE ...]``."""
    from tokenflow.evaluation.summary import is_run_dir, job_dirs

    parser = argparse.ArgumentParser(prog="tokenflow-metrics", description="Score finished runs again (no editing) "
                                     "and update each run's metrics.json; a multirun directory scores all its jobs.")
    parser.add_argument("items", nargs="+", metavar="RUN_DIR|KEY=VALUE",
                        help="run or multirun directories, and suite settings such as clip.model=/path/to/clip")
    parser.add_argument("--metrics", default=None, help="conf/metrics option (default, full, tiny, none) or a YAML "
                        "file; default: the run's own metrics config, else 'default'")
    parser.add_argument("--masks", default=None, help="object masks: a folder of images or a video (white = object)")
    parser.add_argument("--prompt", default=None, help="target prompt (default: the run's)")
    parser.add_argument("--device", default=None, help="device of model-based metrics (default: the run's)")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    overrides = [i for i in args.items if "=" in i and not Path(i).exists()]
    runs = [Path(i) for i in args.items if i not in overrides]
    failures = 0
    for run in runs:
        try:
            jobs = [run] if is_run_dir(run) else job_dirs(run)
        except TokenFlowError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        for job in jobs:
            try:
                record = recompute(job, args.metrics, args.masks, args.prompt, overrides, args.device)
            except TokenFlowError as e:
                print(f"{job}: error: {e}", file=sys.stderr)
                failures += 1
                continue
            print(f"{job}: " + ", ".join(f"{k}={record['metrics'][k]:.4g}" for k in record["info"]["recomputed_metrics"]))
    return 2 if failures else 0
