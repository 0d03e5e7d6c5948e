"""A running job's report: its metrics (with definitions) and info, its outputs published only on success.

Outputs are written into a hidden staging folder and moved into the run folder just before
metrics.json, when everything succeeded: a failed or killed run leaves no output under a final name
(it still writes config.yaml and, unless killed, metrics.json).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokenflow.atomic import temp_path
from tokenflow.core.memory import peak_rss
from tokenflow.runs.pipeline_metrics import PIPELINE_METRICS
from tokenflow.runs.record import new_record, write_record

MB = 1 << 20


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
        return write_record(self.folder, new_record(self.task, self.overrides, self.metrics, self.definitions,
                                                    self.info, error))

    def _memory(self) -> None:
        self.metric("peak_rss_mb", peak_rss() / MB)
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.metric("peak_cuda_mb", torch.cuda.max_memory_allocated() / MB)
