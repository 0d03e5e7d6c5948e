"""The command line's side of the run record: config.yaml as Hydra resolved it, and a sweep's failed jobs.

The record itself (``metrics.json``) and the staging of outputs are :mod:`tokenflow.runs`' (:class:`~tokenflow.runs.report.RunReport`).
:class:`FailedJobs` is a Hydra callback that turns a sweep with failed jobs into exit status 2 with one line per
failed job.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tokenflow.atomic import naming_failures
from tokenflow.runs.layout import CONFIG, HYDRA_OVERRIDES, METRICS, job_order


def save_config(cfg: DictConfig, folder: Path) -> Path:
    """config.yaml: the resolved config, or as given when it does not resolve (a failing job keeps one)."""
    path = folder / CONFIG
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
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=job_order)
    for job in jobs:
        overrides = _job_overrides(job)
        try:
            metrics = json.loads((job / METRICS).read_text())
        except (OSError, ValueError):
            lines.append(f"job {job.name} ({overrides}): wrote no metrics.json — it was killed or crashed; see {job}")
            continue
        if metrics.get("status") != "ok":
            lines.append(f"job {job.name} ({overrides}): {metrics.get('error')}")
    return lines


def _job_overrides(job: Path) -> str:
    try:
        return " ".join(OmegaConf.load(job / HYDRA_OVERRIDES))
    except Exception:
        return "?"


class FailedJobs(Callback):
    """Hydra callback: after a sweep, exit 2 with one line per failed job (the sweep itself never stops)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        lines = failed_jobs(sweep_dir) if sweep_dir.is_dir() else []
        if lines:
            raise SweepFailed(lines)
