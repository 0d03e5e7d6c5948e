"""A Hydra sweep read from its multirun directory: its jobs, the parameters swept across them, their metrics.

A multirun directory holds one job folder per job (``0``, ``1``, ...; the layout of :mod:`tokenflow.runs`).
:func:`load_sweep` reads it into a :class:`Sweep` (swept parameters = override keys whose values differ across
jobs); jobs are grouped by input (a dataset run's item, else the video).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenflow.errors import VideoError
from tokenflow.runs.layout import CONFIG, HYDRA_CONFIG, is_run_dir, job_dirs
from tokenflow.runs.outputs import input_path, output_path
from tokenflow.runs.record import is_number, load_record

GROUP_KEY = "video"   # the run key that names the input clip; a dataset sweep groups its contact sheets by it
ITEM_KEY = "item"     # a dataset run, <item name>/<prompt index>: its item (one clip at one size) is its group


@dataclass
class Job:
    """One job folder of a sweep."""

    path: Path
    record: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ok(self) -> bool:
        return self.record.get("status") == "ok"

    @property
    def status(self) -> str:
        return str(self.record.get("status"))

    @property
    def error(self) -> str:
        return " ".join(str(self.record.get("error") or "").split())

    @property
    def overrides(self) -> dict[str, Any]:
        return self.record.get("overrides") or {}

    @property
    def metrics(self) -> dict[str, int | float]:
        return {k: v for k, v in (self.record.get("metrics") or {}).items() if is_number(v)}

    def output(self) -> Path | None:
        """The edited frames: ``frames/`` (lossless) if present, else ``edited.mp4`` / ``reconstruction.mp4``."""
        return output_path(self.path)

    def input(self) -> Path | None:
        return input_path(self.path)

    def group(self) -> str:
        """The input clip this job edited: a dataset run's item name (the video's stem unless the manifest
        names it), else config/override ``video``, else a hash of input.mp4."""
        for source in (self.config, self.overrides):
            if source.get(ITEM_KEY) not in (None, ""):
                return str(source[ITEM_KEY]).rpartition("/")[0] or str(source[ITEM_KEY])
        for source in (self.config, self.overrides):
            if source.get(GROUP_KEY) not in (None, ""):
                return str(source[GROUP_KEY])
        clip = self.input()
        return "input-" + hashlib.sha1(clip.read_bytes()).hexdigest()[:8] if clip else "unknown"


@dataclass
class Sweep:
    """Jobs of a multirun directory, the parameters swept across them and the metrics they report."""

    root: Path
    jobs: list[Job]
    swept: list[str]
    metrics: list[str]

    def value(self, job: Job, key: str) -> Any:
        return job.overrides.get(key)

    def definitions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for job in self.jobs:
            out.update({k: v for k, v in (job.record.get("definitions") or {}).items() if k in self.metrics})
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per job: job, status, swept parameters, every metric (None where absent), error."""
        return [{"job": j.name, "status": j.status, **{k: self.value(j, k) for k in self.swept},
                 **{m: j.metrics.get(m) for m in self.metrics}, "error": j.error or None} for j in self.jobs]

    def groups(self) -> dict[str, list[Job]]:
        """Jobs by input clip (one group unless a dataset of videos was swept)."""
        out: dict[str, list[Job]] = {}
        for job in self.jobs:
            out.setdefault(job.group(), []).append(job)
        return out

    def label(self, job: Job, skip: Sequence[str] = (GROUP_KEY,)) -> str:
        """``#<job>`` and one ``key=value`` line per swept parameter (except ``skip``)."""
        lines = [f"#{job.name}"] + [f"{k}={short(self.value(job, k))}" for k in self.swept if k not in skip]
        return "\n".join(lines)


def value_key(value: Any) -> str:
    """``value`` as text that compares equal exactly when the values do (swept values are grouped by it)."""
    return json.dumps(value, sort_keys=True, default=str)


def short(value: Any) -> str:
    """``value`` as a label (floats to 4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def safe_name(name: str) -> str:
    """``name`` as a file-name stem (runs of other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def load_sweep(root: str | Path) -> Sweep:
    """Read a multirun directory (or one run directory) into a :class:`Sweep`."""
    from omegaconf import OmegaConf

    root = Path(root)
    paths = [root] if is_run_dir(root) else job_dirs(root)
    if not paths:
        raise VideoError(f"'{root}' has no job folders (with metrics.json or .hydra/overrides.yaml) — point at a "
                         "Hydra multirun directory such as multirun/edit/<date>/<time>")
    jobs = []
    for p in paths:  # the resolved config.yaml, else Hydra's composed one (a job killed before writing its own)
        path = next((c for c in (p / CONFIG, p / HYDRA_CONFIG) if c.is_file()), None)
        config = OmegaConf.to_container(OmegaConf.load(path)) if path is not None else {}
        jobs.append(Job(p, load_record(p), config if isinstance(config, dict) else {}))
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({value_key(j.overrides.get(k)) for j in jobs}) > 1]
    metrics = list(dict.fromkeys(m for j in jobs if j.ok for m in j.metrics))
    return Sweep(root, jobs, swept, metrics)
