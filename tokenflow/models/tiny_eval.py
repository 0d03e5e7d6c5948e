"""Tiny random-weight CLIP and DINO-like ViT models, built offline from config, for tests and demos of the
model-based metrics (:mod:`tokenflow.evaluation.model_metrics`).

They have the real architectures (``transformers`` ``CLIPModel``, ``Dinov2Model`` or ``ViTModel``) with
tiny widths and random weights, and are saved in the usual ``save_pretrained`` layout (with an image
processor and, for CLIP, the real CLIP BPE tokenizer), so the metrics load them through the same code
path as a hub checkpoint. Their scores are MEANINGLESS: every folder carries :data:`MARKER`, which the
metrics read to label their outputs so.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenflow.digests import json_digest
from tokenflow.errors import ConfigError
from tokenflow.models.tiny import build_once
from tokenflow.rng import seeded_init

MARKER = "tokenflow_tiny_eval.json"  # present in every folder built here: "these weights are random"
TINY_EVAL_FORMAT = 1
DINO_KINDS = ("dinov2", "vit")


@dataclass(frozen=True)
class TinyClipSpec:
    """Widths and seed of the tiny CLIP; every field enters its cache key."""

    seed: int = 0
    width: int = 32
    layers: int = 2
    heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    projection_dim: int = 16

    def key(self) -> str:
        return _key({"clip": asdict(self)})


@dataclass(frozen=True)
class TinyDinoSpec:
    """A tiny self-supervised-ViT-shaped encoder: ``dinov2`` (Dinov2Model) or ``vit`` (ViTModel, DINO v1)."""

    seed: int = 0
    kind: str = "dinov2"
    width: int = 32
    layers: int = 2
    heads: int = 4
    image_size: int = 32
    patch_size: int = 8

    def __post_init__(self) -> None:
        if self.kind not in DINO_KINDS:
            raise ConfigError(f"tiny DINO kind={self.kind!r} is unknown — use one of {', '.join(DINO_KINDS)}")

    def key(self) -> str:
        return _key({"dino": asdict(self)})


def _key(blob: dict) -> str:
    return json_digest({**blob, "format": TINY_EVAL_FORMAT}, 16)


def build_tiny_clip(folder: Path, spec: TinyClipSpec = TinyClipSpec()) -> None:
    """Save a random-weight ``CLIPModel`` + tokenizer + image processor from ``spec`` under ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from tokenflow.models.tiny import write_clip_tokenizer_files

    text = dict(vocab_size=49408, hidden_size=spec.width, intermediate_size=2 * spec.width,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, max_position_embeddings=77,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=spec.width, intermediate_size=2 * spec.width, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, image_size=spec.image_size, patch_size=spec.patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection_dim)
    with seeded_init(spec.seed):
        model = CLIPModel(config)
    model.save_pretrained(folder)
    write_clip_tokenizer_files(folder)
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": spec.image_size},
                       crop_size={"height": spec.image_size, "width": spec.image_size}).save_pretrained(folder)
    _mark(folder, {"clip": asdict(spec)})


def build_tiny_dino(folder: Path, spec: TinyDinoSpec = TinyDinoSpec()) -> None:
    """Save a random-weight ``Dinov2Model`` or ``ViTModel`` + image processor from ``spec`` under ``folder``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

    common = dict(hidden_size=spec.width, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                  image_size=spec.image_size, patch_size=spec.patch_size)
    if spec.kind == "dinov2":
        with seeded_init(spec.seed):
            model = Dinov2Model(Dinov2Config(mlp_ratio=2, **common))
        processor = BitImageProcessor(size={"shortest_edge": spec.image_size},
                                      crop_size={"height": spec.image_size, "width": spec.image_size},
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    else:
        with seeded_init(spec.seed):
            model = ViTModel(ViTConfig(intermediate_size=2 * spec.width, **common), add_pooling_layer=False)
        processor = ViTImageProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _mark(folder, {"dino": asdict(spec)})


def _mark(folder: Path, spec: dict) -> None:
    (folder / MARKER).write_text(json.dumps({"meaningless": True, "format": TINY_EVAL_FORMAT, **spec}, indent=2))


def is_tiny_eval(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder built here (random weights: scores are meaningless)."""
    return (Path(path) / MARKER).is_file()


def tiny_clip_folder(cache_dir: str | os.PathLike, spec: TinyClipSpec = TinyClipSpec()) -> Path:
    """Folder of the tiny CLIP for ``spec`` under ``cache_dir/models``, built once (atomically) if absent."""
    return build_once(Path(cache_dir).expanduser() / "models" / f"tiny-clip-{spec.key()}", MARKER,
                      lambda f: build_tiny_clip(f, spec))


def tiny_dino_folder(cache_dir: str | os.PathLike, spec: TinyDinoSpec = TinyDinoSpec()) -> Path:
    """Folder of the tiny DINO-like ViT for ``spec`` under ``cache_dir/models``, built once if absent."""
    return build_once(Path(cache_dir).expanduser() / "models" / f"tiny-{spec.kind}-{spec.key()}", MARKER,
                      lambda f: build_tiny_dino(f, spec))
