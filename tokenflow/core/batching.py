"""Assembling one model call's batch from its branches: per-video rows for the call's frames, and the branches'
extra model inputs (ControlNet residuals: tensors, or lists and dicts of them) concatenated along the batch, zeros
for a branch without them."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokenflow.errors import ConfigError


def branch_rows(t: Tensor, frames: Tensor) -> Tensor:
    """Rows of a (1 or N, ...) per-video tensor for ``frames``: the shared row repeated, or per-frame rows."""
    return t.expand(len(frames), *t.shape[1:]) if t.shape[0] == 1 else t[frames.to(t.device)]


def merge_model_inputs(parts: list[dict[str, Any] | None], sizes: list[int]) -> dict[str, Any]:
    """Concatenate branches' extra UNet inputs along the batch; a branch without one gets zeros of its size."""
    keys = [k for part in parts if part for k in part]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(keys):
        template = next(part[key] for part in parts if part and key in part)
        values = [part[key] if part and key in part else _zeros(template, n) for part, n in zip(parts, sizes)]
        merged[key] = _concat(values)
    return merged


def _zeros(template: Any, n: int) -> Any:
    if isinstance(template, Tensor):
        return template.new_zeros(n, *template.shape[1:])
    if isinstance(template, (list, tuple)):
        return type(template)(_zeros(t, n) for t in template)
    if isinstance(template, dict):
        return {k: _zeros(v, n) for k, v in template.items()}
    raise ConfigError(f"unet_inputs values must be tensors (or lists/dicts of them), got {type(template).__name__}")


def _concat(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(v)) for v in zip(*values))
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values]) for k in first}
    raise ConfigError(f"unet_inputs values must be tensors (or lists/dicts of them), got {type(first).__name__}")
