"""A job folder written in-process, in the layout ``tokenflow-edit -m`` leaves (for tests and in-process sweeps)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow.atomic import atomic_file
from tokenflow.runs.layout import CONFIG, EDITED, HYDRA_OVERRIDES, INPUT
from tokenflow.runs.overrides import override_line
from tokenflow.runs.record import new_record, write_record
from tokenflow.storage.mp4 import write_video


def write_job(job_dir: str | Path, overrides: Mapping[str, Any], config: Mapping[str, Any] | None = None,
              metrics: Mapping[str, float] | None = None, definitions: Mapping[str, str] | None = None,
              source: np.ndarray | None = None, edited: np.ndarray | None = None, fps: float = 10.0,
              error: str | None = None, task: str = "edit", info: Mapping[str, Any] | None = None) -> Path:
    """Write one job folder in the multirun layout: metrics.json, config.yaml, .hydra/overrides.yaml and,
    when given, input.mp4 / edited.mp4. ``error`` set → status ``failed``. Returns the folder."""
    import yaml

    job = Path(job_dir)
    (job / HYDRA_OVERRIDES).parent.mkdir(parents=True, exist_ok=True)
    lines = [override_line(k, v) for k, v in overrides.items()]
    with atomic_file(job / HYDRA_OVERRIDES) as tmp:
        tmp.write_text(yaml.safe_dump(lines))
    with atomic_file(job / CONFIG) as tmp:
        tmp.write_text(yaml.safe_dump(dict(config or {}), sort_keys=False))
    if source is not None:
        write_video(job / INPUT, source, fps)
    if edited is not None:
        write_video(job / EDITED, edited, fps)
    write_record(job, new_record(task, overrides, metrics, definitions, info, error or None))
    return job
