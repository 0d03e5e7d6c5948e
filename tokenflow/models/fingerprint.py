"""Identify a model by its content: every weight of every component, every config, the scheduler, the dtype.

Caches keyed on the fingerprint therefore miss after any change to the weights (a merged LoRA, a
fine-tuned text encoder, one edited value) and hit for the same weights loaded from another folder.
Each tensor is reduced on its own device, exactly, to two residues of a position-weighted sum of
its raw bits modulo two primes (no host copy of the weights; one pass over them): changing any
single element changes both residues.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

_PRIMES = (2_147_483_647, 2_147_483_629)  # 2^31 - 1 and the largest prime below it
_CHUNK = 1 << 22  # elements reduced at once (bounds the temporary int64 buffers)


def tensor_digest(t: torch.Tensor) -> tuple[int, int]:
    """Two residues that change with any element of ``t`` (its raw bits, so dtype-exact)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.is_floating_point() or flat.is_complex():
        width = flat.element_size()
        flat = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width])
    out = []
    for k, p in enumerate(_PRIMES):
        total = torch.zeros((), dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), _CHUNK):
            bits = flat[start : start + _CHUNK].to(torch.int64).remainder(p)
            pos = torch.arange(start, start + bits.numel(), device=flat.device, dtype=torch.int64)
            weights = (pos * (40503 + 7 * k) + 12345 + k).remainder(p - 1) + 1  # in [1, p)
            total = (total + (bits * weights).remainder(p).sum().remainder(p)).remainder(p)
        out.append(int(total))
    return out[0], out[1]


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: name, shape, dtype and :func:`tensor_digest`."""
    h = hashlib.sha256()
    for name, tensor in sorted(list(module.named_parameters()) + list(module.named_buffers()), key=lambda kv: kv[0]):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{tensor_digest(tensor)}".encode())
    return h.hexdigest()


def public_config(config: Any) -> dict:
    """A component's config without bookkeeping keys (``_name_or_path``, ``_diffusers_version``, ...)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in raw.items() if not str(k).startswith("_") and k not in ("transformers_version", "name_or_path")}


def model_fingerprint(model: Any) -> str:
    """Content hash of a :class:`~tokenflow.models.backbone.DiffusionModel` (20 hex digits)."""
    h = hashlib.sha256()
    parts = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder,
             "text_encoder_2": getattr(model, "text_encoder_2", None)}
    for name, part in parts.items():
        if part is None:
            continue
        h.update(name.encode())
        h.update(json.dumps(public_config(part.config), sort_keys=True, default=str).encode())
        h.update(module_digest(part).encode())
    for tokenizer in (model.tokenizer, getattr(model, "tokenizer_2", None)):
        if tokenizer is not None:
            h.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.model_max_length}".encode())
    h.update(json.dumps(public_config(model.scheduler.config), sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    return h.hexdigest()[:20]
