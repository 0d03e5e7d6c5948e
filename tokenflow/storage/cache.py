"""Content-addressed inversion cache: one safetensors file per key, written atomically, verified on load.

The key hashes the frames' pixels (so the video bytes, the frames selected and the size), the model
fingerprint (its weights' content, not their folder), the inverter settings and the inversion prompt:
an edit or a sweep never inverts the same video twice, and a changed input never hits a stale entry.
The checksum covers everything a load returns, the tensors and the manifest (timesteps, prompt,
settings, ...): a damaged or edited file (truncated, bit flip, swapped header values, foreign) fails
it and is recomputed, never loaded. The cache is an optimisation: a folder that cannot be written
(read-only, full) is reported once per entry and the run goes on without it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from tokenflow.models.trajectory import InversionResult, NullTextEmbeddings
from tokenflow.storage.atomic import atomic_file, remove_stale

log = logging.getLogger(__name__)
CACHE_FORMAT = 3  # 3: checksum over tensors and manifest, tensor layouts kept


def cache_key(**parts: Any) -> str:
    """Stable hash of JSON-serialisable parts."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and of the manifest without its checksum."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    h.update(json.dumps(body, sort_keys=True, default=str).encode())
    return h.hexdigest()


class CacheEntryError(ValueError):
    """A cache file that is not what its key promises (damaged, edited, foreign)."""


class InversionCache:
    """Directory of ``<key>.safetensors`` inversion results."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> InversionResult | None:
        """The cached result, or None when absent or damaged (a damaged entry is deleted)."""
        path = self.path(key)
        try:
            data = path.read_bytes()  # one read: what is verified is what is returned
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("inversion cache entry %s cannot be read (%s): recomputing it", path.name, e)
            return None
        try:
            return _decode(data, key)
        except Exception as e:  # any damage means: recompute
            log.warning("inversion cache entry %s is damaged (%s): recomputing it", path.name, e)
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
            return None

    def save(self, key: str, result: InversionResult, **info: Any) -> Path | None:
        """Write atomically (see :mod:`tokenflow.storage.atomic`); on a folder that cannot be written
        (read-only, full, gone) warn and return None: the run goes on without caching."""
        tensors = {"latents": result.latents, "clean": result.clean}
        tensors.update({f"extra.{k}": v for k, v in result.extras.items()})
        extra_meta: dict[str, Any] = {}
        if result.null_text is not None:
            tensors["null_text.table"] = result.null_text.table
            if result.null_text.pooled is not None:
                tensors["null_text.pooled"] = result.null_text.pooled
            extra_meta["null_text_guidance_scale"] = result.null_text.guidance_scale
        strides = {name: list(t.stride()) for name, t in tensors.items() if _dense(t) and not t.is_contiguous()}
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        manifest: dict[str, Any] = {"format": CACHE_FORMAT, "key": key, "timesteps": [int(t) for t in result.timesteps],
                                    "prompt": result.prompt, "settings": result.settings, "strides": strides,
                                    **extra_meta, **info}
        manifest = json.loads(json.dumps(manifest, default=str))  # what a load will read back
        manifest["checksum"] = _checksum(tensors, manifest)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path(key)) as tmp:
                save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest)})
        except OSError as e:
            log.warning("cannot write the inversion cache in %s (%s) — going on without caching this inversion; "
                        "free space there or set cache_dir= to a writable folder", self.directory, e.strerror or e)
            return None
        return self.path(key)

    def remove_stale(self) -> list[Path]:
        """Delete temporary files left by killed processes (see :func:`tokenflow.storage.atomic.remove_stale`)."""
        return remove_stale(self.directory)


def _decode(data: bytes, key: str) -> InversionResult:
    """Parse and verify a cache file's bytes; raises CacheEntryError (or a parse error) when anything is off."""
    manifest = json.loads(_header(data).get("__metadata__", {})["manifest"])
    tensors = load_bytes(data)
    if manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
        raise CacheEntryError("written for another key or format")
    if manifest.get("checksum") != _checksum(tensors, manifest):
        raise CacheEntryError("checksum mismatch")
    latents, clean, timesteps = tensors["latents"], tensors["clean"], manifest["timesteps"]
    if latents.ndim != 5 or latents.shape[0] != len(timesteps) or latents.shape[1:] != clean.shape:
        raise CacheEntryError(f"latents {tuple(latents.shape)} do not match {len(timesteps)} timesteps and clean "
                              f"{tuple(clean.shape)}")
    tensors = {name: _restride(t, manifest["strides"].get(name)) for name, t in tensors.items()}
    extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    null_text = None
    if "null_text.table" in tensors:
        null_text = NullTextEmbeddings(tensors["null_text.table"], float(manifest["null_text_guidance_scale"]),
                                       tensors.get("null_text.pooled"))
    return InversionResult([int(t) for t in timesteps], tensors["latents"], tensors["clean"], manifest["prompt"],
                           manifest["settings"], null_text, extras)


def _header(data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the header)."""
    if len(data) < 8:
        raise CacheEntryError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CacheEntryError("header longer than the file")
    return json.loads(data[8 : 8 + n])


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides are a permutation of a contiguous layout (no gaps, no overlaps)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _restride(t: torch.Tensor, stride: list[int] | None) -> torch.Tensor:
    """``t`` laid out with the saved ``stride`` (e.g. channels-last latents), so a loaded inversion runs
    through the same kernels as the freshly computed one; contiguous when none was saved."""
    if stride is None:
        return t
    if len(stride) != t.ndim:
        raise CacheEntryError("stride record does not match the tensor")
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype)
    if not _dense(out):
        raise CacheEntryError("stride record is not a dense layout")
    return out.copy_(t)
