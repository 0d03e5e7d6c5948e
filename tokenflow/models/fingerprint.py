"""Identify a model by what it computes: every weight of every component, every config, the scheduler, the
dtype, and the state of its peft adapters (which are active, their scales, disabled or merged).

Caches keyed on the fingerprint therefore miss after any change to the weights (a merged LoRA, a
fine-tuned text encoder, one edited value) or to the adapters (disabled, re-weighted, switched), and
hit for the same weights loaded from another folder.
Each tensor is reduced on its own device, exactly, to two residues of a position-weighted sum of
its raw bits modulo two primes (no host copy of the weights; integer multiply-adds, no per-element
division): changing any single element changes both residues.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from tokenflow.digests import text_digest

_PRIMES = (2_147_483_647, 2_147_483_629)  # 2^31 - 1 and the largest prime below it
_BLOCK = 1 << 15   # elements summed exactly in int64 before a reduction: 2^15 · 2^16 · 2^31 < 2^63
_SPAN = 1 << 22    # elements converted at once (bounds the temporary int64 buffers)


def tensor_digest(t: torch.Tensor) -> tuple[int, int]:
    """Two residues that change with any element of ``t`` (its raw bits, so dtype-exact).

    With v_i the raw bits as a signed integer and w_i ∈ [1, p) a fixed weight of position i, the residue
    is Σ v_i·w_i mod p for each of two primes p. Each v_i is split into 16-bit halves so the products of a
    block of positions sum exactly in int64 (no per-element division); blocks are then reduced mod p. A
    change δ of one element (|δ| < 2^32) moves a residue by δ·w_i ≢ 0 (mod p) unless p divides δ, and no
    such δ is divisible by both primes.
    """
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.element_size() == 8 or flat.is_complex():
        flat = flat.view(torch.int32)  # 64-bit words as pairs of 32-bit ones: every v_i then fits 32 bits
    elif flat.is_floating_point():
        flat = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[flat.element_size()])
    n, device = flat.numel(), flat.device
    block = max(1, min(_BLOCK, n))
    pos = torch.arange(block, device=device, dtype=torch.int64)
    weights = [(pos * (40503 + 7 * k) + 12345 + k).remainder(p - 1) + 1 for k, p in enumerate(_PRIMES)]
    totals = [0, 0]
    for start in range(0, n, _SPAN):
        part = flat[start : start + _SPAN].to(torch.int64)
        if part.numel() % block:
            part = torch.nn.functional.pad(part, (0, block - part.numel() % block))
        rows = part.view(-1, block)
        lo, hi = rows & 0xFFFF, rows >> 16  # v = lo + 2^16·hi with lo ∈ [0, 2^16), |hi| ≤ 2^15
        first = start // block
        index = torch.arange(first, first + rows.shape[0], device=device, dtype=torch.int64)
        for k, p in enumerate(_PRIMES):
            w = weights[k]
            sums = ((lo * w).sum(1).remainder(p) + (hi * w).sum(1).remainder(p) * 65536).remainder(p)
            u = (index * (69069 + 11 * k) + 1013 + k).remainder(p - 1) + 1  # block weights in [1, p)
            totals[k] = (totals[k] + int((sums * u).remainder(p).sum().remainder(p))) % p
    return totals[0], totals[1]


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


def weights_fingerprint(model: Any) -> str:
    """Content hash of a :class:`~tokenflow.models.backbone.DiffusionModel`'s weights, configs, tokenizers,
    scheduler and dtype (20 hex digits): the expensive part of :func:`model_fingerprint`, which reads every weight."""
    h = hashlib.sha256()
    for name, part in _components(model).items():
        h.update(name.encode())
        h.update(json.dumps(public_config(part.config), sort_keys=True, default=str).encode())
        h.update(module_digest(part).encode())
    for tokenizer in model.tokenizers():
        if tokenizer is not None:
            h.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.model_max_length}".encode())
    h.update(json.dumps(public_config(model.scheduler.config), sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    return h.hexdigest()[:20]


def weights_signature(model: Any) -> tuple:
    """Which tensors hold the weights, and how often each was written in place (cheap: no weight is read).

    It changes when a parameter or buffer is added (a LoRA loaded into the UNet), replaced (``.to``, a new
    ``Parameter``) or modified by an in-place torch op (a merged adapter); writes through ``.data`` are not seen.
    """
    entries = []
    for name, part in _components(model).items():
        for key, t in list(part.named_parameters()) + list(part.named_buffers()):
            try:
                version = t._version
            except RuntimeError:  # an inference-mode tensor keeps no version counter
                version = None
            entries.append((name, key, t.data_ptr(), version, tuple(t.shape), t.dtype, str(t.device)))
    return tuple(entries)


def adapter_state(module: torch.nn.Module) -> list[list]:
    """What the peft tuner layers in ``module`` compute with: per layer, its name, the active adapters, their
    scaling, whether adapters are disabled and which are merged (``[]`` without adapters).

    A LoRA's matrices are parameters whether it is active or not, so the weights alone cannot tell a disabled
    or zero-weighted adapter from an active one. Duck-typed on peft's ``BaseTunerLayer`` (``active_adapters``,
    ``merged_adapters``, ``disable_adapters`` attributes), so peft need not be installed; the model-level
    methods of the same names (diffusers' and transformers' adapter mixins) are not layers and are skipped.
    """
    state = []
    for name, layer in module.named_modules():
        if not hasattr(layer, "merged_adapters"):
            continue
        active = getattr(layer, "active_adapters", None)
        disabled = getattr(layer, "_disable_adapters", getattr(layer, "disable_adapters", None))
        if active is None or callable(active) or callable(disabled):
            continue
        active = [active] if isinstance(active, str) else list(active)
        scaling = getattr(layer, "scaling", None)
        scales = {a: _number(scaling[a]) for a in active if a in scaling} if isinstance(scaling, dict) else None
        state.append([name, active, scales, bool(disabled), sorted(layer.merged_adapters)])
    return state


def model_fingerprint(model: Any, weights: str | None = None) -> str:
    """Content hash of a :class:`~tokenflow.models.backbone.DiffusionModel` (20 hex digits).

    The :func:`weights_fingerprint` (``weights``, when already computed) alone for a model without adapters;
    with peft adapters, combined with every component's :func:`adapter_state`, which is cheap to read.
    """
    weights = weights or weights_fingerprint(model)
    adapters = {name: state for name, part in _components(model).items() if (state := adapter_state(part))}
    if not adapters:
        return weights
    return text_digest(weights + json.dumps(adapters, sort_keys=True, default=str), 20)


def _components(model: Any) -> dict[str, torch.nn.Module]:
    """The backbone's networks by name (SD: unet, vae, text encoders; SD 3: transformer, vae, three text encoders)."""
    return model.components()


def _number(value: Any) -> float | str:
    """A scaling value as a float (a Python number or a one-element tensor), else its repr."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return repr(value)
