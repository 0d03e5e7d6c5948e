"""Run directories that are unique by construction: each run claims its folder with an exclusive mkdir.

The default Hydra run dir ``outputs/<task>/<date>/<time>`` has one-second resolution, so two runs
started in the same second (two shells, a job array) would write into one folder. The
``${tokenflow.claim:<base>}`` resolver creates ``<base>`` itself if it is free, else ``<base>-1``,
``<base>-2``, ...; ``os.mkdir`` fails when the folder exists, so two processes (or two machines on
one file system) can never obtain the same folder, whatever the launcher. The resolver is cached
(``use_cache``): every later resolution in the run, and every job of a sweep (Hydra copies the
resolver cache into each job's config), sees the folder claimed first.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "tokenflow.claim"
MAX_TRIES = 10_000


def claim_dir(base: str | os.PathLike) -> str:
    """Create and return ``base``, or the first free ``base-1``, ``base-2``, ... (never an existing folder)."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(MAX_TRIES):
        path = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return str(path)
    raise FileExistsError(f"{MAX_TRIES} run folders named {base}-* exist — clean up {base.parent}")


def register_resolvers() -> None:
    """Register ``${tokenflow.claim:...}`` (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, claim_dir, use_cache=True)
