"""Provenance of a run: which code, packages, machine, input, model, seed and config produced it.

:func:`run_manifest` gathers it as a JSON-ready dict; :func:`write_manifest` writes it atomically as
``manifest.json`` in the run directory. Nothing here fails a run: facts that cannot be found (no git
checkout, a package not installed, no CUDA) are recorded as ``null``.
"""
from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from tokenflow.atomic import write_json
from tokenflow.runs.layout import MANIFEST

MANIFEST_FORMAT = 1
MANIFEST_NAME = MANIFEST  # its name in the run folder (tokenflow.runs.layout)
DISTRIBUTION = "tokenflow-video"

# package -> distribution names to try (the first installed one is reported)
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "diffusers": ("diffusers",),
    "transformers": ("transformers",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "numpy": ("numpy",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"),
    "hydra": ("hydra-core",),
    "omegaconf": ("omegaconf",),
    "accelerate": ("accelerate",),
    "safetensors": ("safetensors",),
}


def package_versions() -> dict[str, str | None]:
    """Installed version of each package of :data:`PACKAGES` (``None`` when not installed), plus Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in PACKAGES.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """Commit and dirtiness of the git checkout whose top level is ``path``, or None (not a checkout, no git).

    Only a checkout rooted exactly at ``path`` counts, so a package installed inside some other
    repository (a site-packages under a project folder) reports no commit.
    """
    root = Path(path).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status), "root": str(root)}


def library_info() -> dict[str, Any]:
    """The library's version and, when it is imported from a git checkout, that checkout's commit."""
    import tokenflow

    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = getattr(tokenflow, "__version__", None)
    checkout = Path(tokenflow.__file__).resolve().parent.parent  # the folder holding the tokenflow package
    return {"name": DISTRIBUTION, "version": version, "path": str(Path(tokenflow.__file__).resolve().parent),
            "git": git_info(checkout)}


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo, else ``platform.processor()``)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def device_info(model: Any = None) -> dict[str, Any]:
    """CPU model and count, CUDA devices by name, and the model's device when given."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "torch_cuda": torch.version.cuda,
        "model_device": None if model is None else str(getattr(model, "device", None)),
    }


def _config(cfg: Any) -> Any:
    """The resolved config as plain containers (unresolved if an interpolation cannot resolve here)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # e.g. ${hydra:...} outside a Hydra app
            return OmegaConf.to_container(cfg, resolve=False)
    return cfg


def run_manifest(cfg: Any = None, model: Any = None, video: Any = None, seed: int | None = None,
                 command: list[str] | None = None, started_at: datetime | None = None) -> dict[str, Any]:
    """Everything needed to tell how a run was produced, as a JSON-ready dict.

    ``cfg``: the run config (DictConfig or dict; stored resolved); ``model``: a DiffusionModel (identity,
    content fingerprint, dtype); ``video``: the input :class:`~tokenflow.storage.video.Video` (content hash
    by :func:`~tokenflow.storage.video.video_fingerprint`, size, fps, source); ``seed``: default
    ``cfg.seed``; ``command``: default ``sys.argv``; ``started_at``: default now (UTC).
    """
    from tokenflow.digests import video_fingerprint

    config = _config(cfg)
    if seed is None and isinstance(config, dict):
        seed = config.get("seed")
    video_info = None
    if video is not None:
        video_info = {"source": getattr(video, "source", None), "fingerprint": video_fingerprint(video),
                      "n_frames": video.n_frames, "height": video.height, "width": video.width, "fps": video.fps}
    model_info = None
    if model is not None:
        model_info = {"identity": getattr(model, "identity", None), "fingerprint": getattr(model, "fingerprint", None),
                      "dtype": str(getattr(model, "dtype", None)).replace("torch.", "")}
    argv = list(sys.argv if command is None else command)
    return {
        "format": MANIFEST_FORMAT,
        "library": library_info(),
        "packages": package_versions(),
        "device": device_info(model),
        "video": video_info,
        "model": model_info,
        "seed": seed,
        "config": config,
        "command": shlex.join(argv),
        "argv": argv,
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "started_at": (started_at or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
    }


def write_manifest(run_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as ``run_dir/manifest.json``, atomically; returns the path."""
    return write_json(Path(run_dir) / MANIFEST_NAME, manifest)
