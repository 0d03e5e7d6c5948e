"""The run record, ``metrics.json``: one writer, one reader (which converts the legacy flat format).

Format::

    {"status": "ok" | "failed", "error": None | "one line", "task": "edit" | "invert",
     "overrides": {key: value, ...},          # this job's command-line overrides (.hydra/overrides.yaml)
     "metrics": {name: number, ...}, "definitions": {name: "what it measures"}, "info": {...}}
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenflow.atomic import write_json
from tokenflow.runs.layout import HYDRA_OVERRIDES, METRICS
from tokenflow.runs.overrides import parse_overrides

_INFO_KEYS = ("n_frames", "height", "width", "fps", "model", "keyframes")  # legacy flat metrics.json: not metrics


def is_number(v: Any) -> bool:
    """An int or float that is not a bool (what a metric value is)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def new_record(task: str, overrides: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
               definitions: Mapping[str, str] | None = None, info: Mapping[str, Any] | None = None,
               error: str | None = None) -> dict[str, Any]:
    """A run record: status ``failed`` when ``error`` is set, else ``ok``."""
    return {"status": "failed" if error is not None else "ok", "error": error, "task": task,
            "overrides": dict(overrides or {}), "metrics": dict(metrics or {}), "definitions": dict(definitions or {}),
            "info": dict(info or {})}


def write_record(run_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as the run's metrics.json (atomically); returns its path."""
    return write_json(Path(run_dir) / METRICS, record)


def load_record(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics.json in the current format (a legacy flat file is converted; a missing one gives
    status ``missing``); overrides fall back to ``.hydra/overrides.yaml``."""
    import yaml

    run = Path(run_dir)
    path = run / METRICS
    if path.is_file():
        raw = json.loads(path.read_text())
    else:
        raw = {"status": "missing", "error": "no metrics.json — the job did not finish (killed or still running?)"}
    if "metrics" not in raw and "status" not in raw:  # the flat format of earlier versions
        metrics = {k: v for k, v in raw.items() if is_number(v) and k not in _INFO_KEYS}
        raw = {"status": "ok", "error": None, "metrics": metrics,
               "info": {k: v for k, v in raw.items() if k not in metrics}}
    record = {"status": "ok", "error": None, "task": None, **raw}
    for key in ("overrides", "metrics", "definitions", "info"):
        record[key] = record.get(key) or {}
    hydra_overrides = run / HYDRA_OVERRIDES
    if not record["overrides"] and hydra_overrides.is_file():
        record["overrides"] = parse_overrides(yaml.safe_load(hydra_overrides.read_text()) or [])
    return record
