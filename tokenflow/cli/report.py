"""What a run leaves in its folder: ``metrics.json`` (ok or failed), outputs published only on success.

``metrics.json``::

    {"status": "ok" | "failed", "error": None | "one line", "task": "edit" | "invert",
     "overrides": {key: value, ...},          # this job's command-line overrides (.hydra/overrides.yaml)
     "metrics": {name: number, ...}, "definitions": {name: "what it measures"}, "info": {...}}

Outputs are written into a hidden staging folder and moved into the run folder just before
metrics.json, when everything succeeded: a failed or killed run leaves no output under a final name
(it still writes config.yaml and, unless killed, metrics.json). :class:`FailedJobs` is a Hydra callback that
turns a sweep with failed jobs into exit status 2 with one line per failed job.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tokenflow.core.memory import peak_rss
from tokenflow.evaluation import summary
from tokenflow.evaluation.scores import PIPELINE_METRICS
from tokenflow.atomic import naming_failures, temp_path, write_json

log = logging.getLogger("tokenflow")
MB = 1 << 20

def parse_overrides(lines: list[str]) -> dict[str, Any]:
    """Hydra override lines (``.hydra/overrides.yaml``) as key -> JSON-compatible value."""
    return json.loads(json.dumps(summary.parse_overrides(lines), default=str))


@dataclass
class RunReport:
    """Collects a job's metrics (with definitions) and info, tracks its published outputs, writes metrics.json."""

    folder: Path
    task: str
    overrides: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    definitions: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    _staging: Path | None = None

    def metric(self, name: str, value: float, definition: str | None = None) -> None:
        self.metrics[name] = float(value)
        self.definitions[name] = definition or PIPELINE_METRICS.get(name, name)

    def output(self, name: str) -> Path:
        """Where to write the output ``name``: a hidden staging folder, moved into the run folder only when
        the whole run succeeded (a failed or killed run leaves no output under a final name)."""
        if self._staging is None:
            self._staging = temp_path(self.folder / "outputs")
            self._staging.mkdir(parents=True)
        return self._staging / name

    def write(self, error: str | None = None) -> Path:
        """Write metrics.json (status from ``error``); on success first move the staged outputs into place."""
        if self._staging is not None:
            if error is None:
                for staged in sorted(self._staging.iterdir()):
                    if not staged.name.startswith("."):
                        os.replace(staged, self.folder / staged.name)
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._memory()
        return write_json(self.folder / "metrics.json", {
            "status": "failed" if error is not None else "ok", "error": error, "task": self.task,
            "overrides": self.overrides, "metrics": self.metrics, "definitions": self.definitions, "info": self.info})

    def _memory(self) -> None:
        self.metric("peak_rss_mb", peak_rss() / MB)
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.metric("peak_cuda_mb", torch.cuda.max_memory_allocated() / MB)


def save_config(cfg: DictConfig, folder: Path) -> Path:
    """config.yaml: the resolved config, or as given when it does not resolve (a failing job keeps one)."""
    path = folder / "config.yaml"
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:
        text = OmegaConf.to_yaml(cfg, resolve=False)
    with naming_failures(path):
        path.write_text(text)
    return path


class SweepFailed(SystemExit):
    """Some jobs of a sweep failed: exit status 2, ``lines`` says which and why (one line each)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(2)
        self.lines = lines


def failed_jobs(sweep_dir: Path) -> list[str]:
    """One line per job folder of ``sweep_dir`` whose metrics.json is missing or says failed."""
    lines = []
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    for job in jobs:
        overrides = _job_overrides(job)
        try:
            metrics = json.loads((job / "metrics.json").read_text())
        except (OSError, ValueError):
            lines.append(f"job {job.name} ({overrides}): wrote no metrics.json — it was killed or crashed; see {job}")
            continue
        if metrics.get("status") != "ok":
            lines.append(f"job {job.name} ({overrides}): {metrics.get('error')}")
    return lines


def _job_overrides(job: Path) -> str:
    try:
        return " ".join(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
    except Exception:
        return "?"


class FailedJobs(Callback):
    """Hydra callback: after a sweep, exit 2 with one line per failed job (the sweep itself never stops)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        lines = failed_jobs(sweep_dir) if sweep_dir.is_dir() else []
        if lines:
            raise SweepFailed(lines)
