"""Seeded random numbers: every draw of the library comes from a generator seeded here, never the global RNG."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def seeded(seed: int, device: Any = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (the CPU when None) seeded with ``seed``."""
    return torch.Generator("cpu" if device is None else device).manual_seed(int(seed))


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Module initialisers draw from the global CPU RNG and take no generator: seed it for the block, and leave the
    caller's RNG as it was afterwards (``torch.random.fork_rng``; CUDA's RNGs are not touched)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield
