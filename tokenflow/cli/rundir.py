"""Run directories that are unique by construction: each run claims its folder with an exclusive mkdir.

The default Hydra run dir ``outputs/<task>/<date>/<time>`` has one-second resolution, so two runs
started in the same second (two shells, a job array) would write into one folder. The
``${tokenflow.claim:<base>}`` resolver creates ``<base>`` itself if it is free, else ``<base>-1``,
``<base>-2``, ...; ``os.mkdir`` fails when the folder exists, so two processes (or two machines on
one file system) can never obtain the same folder, whatever the launcher. The resolver is cached
(``use_cache``): every later resolution in the run, and every job of a sweep (Hydra copies the
resolver cache into each job's config), sees the folder claimed first.

A folder named on the command line (``hydra.run.dir=X``, ``hydra.sweep.dir=X``) is claimed too
(``${tokenflow.claim_exact:X}``, :func:`claim_exact`): an exclusive marker file decides which of two runs
given the same folder owns it, and a folder that already holds anything is refused, so one folder never
holds parts of two runs.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from tokenflow.errors import ConfigError

RESOLVER = "tokenflow.claim"
EXACT_RESOLVER = "tokenflow.claim_exact"
MARKER = ".tokenflow-run"  # created exclusively in a folder given as hydra.run.dir / hydra.sweep.dir: its run owns it
MAX_TRIES = 10_000
RUN_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


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


def claim_exact(path: str | os.PathLike, key: str = "hydra.run.dir") -> str:
    """Claim the folder ``path`` the user named for one run (or sweep): create it, or take an existing empty one.

    Ownership is an exclusive create of :data:`MARKER` inside it, so of two runs given the same folder
    exactly one gets it; a folder that already holds anything (a finished run, another run in progress,
    files of yours) is refused in one line, before Hydra or the run writes a byte into it.
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ConfigError(f"{key}={path} already holds a run (its {MARKER} marker is there) — give a new folder, or "
                          f"leave {key} unset for a fresh one") from None
    except OSError as e:
        raise ConfigError(f"{key}={path} cannot be created or written: {e.strerror}"
                          f"{f' (at {e.filename})' if e.filename else ''} — give a folder you can write") from None
    with os.fdopen(fd, "w") as marker:
        marker.write(f"{os.getpid()}\n")
    others = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    if others:
        (folder / MARKER).unlink()
        raise ConfigError(f"{key}={path} is not empty (it holds {', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}) — give a new or empty folder, so that it never holds "
                          "parts of two runs")
    return str(path)


def claimed_run_dir_args(args: list[str]) -> list[str]:
    """``args`` with each ``hydra.run.dir=X`` / ``hydra.sweep.dir=X`` made ``...=${tokenflow.claim_exact:'X',key}``,
    so a folder named on the command line is claimed like the default one (:func:`claim_exact`)."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key in RUN_DIR_KEYS and value and not value.startswith(f"${{{EXACT_RESOLVER}:"):
            quoted = value.replace("\\", "\\\\").replace("'", "\\'")
            arg = f"{key}=${{{EXACT_RESOLVER}:'{quoted}',{key}}}"
        out.append(arg)
    return out


def scratch_run_dir_args(args: list[str], folder: str | os.PathLike) -> list[str]:
    """``args`` for a process that must leave no run folder (a non-zero rank under ``torchrun``): the run and sweep
    folders given are dropped (rank 0 claims them) and Hydra's run folder is ``folder`` (a temporary one the caller
    removes), with no ``.hydra/`` in it."""
    keys = (*RUN_DIR_KEYS, "hydra.output_subdir")
    kept = [arg for arg in args if arg.partition("=")[0].lstrip("+~") not in keys]
    quoted = str(folder).replace("\\", "\\\\").replace("'", "\\'")
    return [*kept, f"hydra.run.dir='{quoted}'", f"hydra.sweep.dir='{quoted}'", "hydra.output_subdir=null"]


def register_resolvers() -> None:
    """Register ``${tokenflow.claim:...}`` and ``${tokenflow.claim_exact:...}`` (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, claim_dir, use_cache=True)
    if not OmegaConf.has_resolver(EXACT_RESOLVER):
        OmegaConf.register_new_resolver(EXACT_RESOLVER, claim_exact, use_cache=True)
