"""Content-addressed inversion cache: one safetensors file per key, written atomically, verified on load.

The key hashes the frames' pixels (so the video bytes, the frames selected and the size), the model
fingerprint, the inverter settings and the inversion prompt: an edit or a sweep never inverts the
same video twice, and a changed input never hits a stale entry. A damaged file (truncated, bit flip,
foreign) fails its checksum and is recomputed, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tokenflow.storage.atomic import atomic_file
from tokenflow.models.trajectory import InversionResult, NullTextEmbeddings

log = logging.getLogger(__name__)
CACHE_FORMAT = 2


def cache_key(**parts: Any) -> str:
    """Stable hash of JSON-serialisable parts."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class InversionCache:
    """Directory of ``<key>.safetensors`` inversion results."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> InversionResult | None:
        """The cached result, or None when absent or damaged (a damaged entry is deleted)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()["manifest"])
            if meta.get("key") != key or meta.get("checksum") != _checksum(tensors):
                raise ValueError("checksum mismatch")
            extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
            null_text = None
            if "null_text.table" in tensors:
                null_text = NullTextEmbeddings(tensors["null_text.table"], float(meta["null_text_guidance_scale"]),
                                               tensors.get("null_text.pooled"))
            return InversionResult(meta["timesteps"], tensors["latents"], tensors["clean"], meta["prompt"],
                                   meta["settings"], null_text, extras)
        except Exception as e:  # any damage means: recompute
            log.warning("inversion cache entry %s is damaged (%s): recomputing it", path.name, e)
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, result: InversionResult, **info: Any) -> Path:
        """Write atomically (see :mod:`tokenflow.storage.atomic`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {"latents": result.latents.contiguous(), "clean": result.clean.contiguous()}
        tensors.update({f"extra.{k}": v.contiguous() for k, v in result.extras.items()})
        extra_meta: dict[str, Any] = {}
        if result.null_text is not None:
            tensors["null_text.table"] = result.null_text.table.contiguous()
            if result.null_text.pooled is not None:
                tensors["null_text.pooled"] = result.null_text.pooled.contiguous()
            extra_meta["null_text_guidance_scale"] = result.null_text.guidance_scale
        manifest = {"key": key, "checksum": _checksum(tensors), "timesteps": list(result.timesteps),
                    "prompt": result.prompt, "settings": result.settings, **extra_meta, **info}
        with atomic_file(self.path(key)) as tmp:
            save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest, default=str)})
        return self.path(key)
