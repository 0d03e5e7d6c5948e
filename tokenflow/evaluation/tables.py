"""A sweep as tables: ``summary.csv`` (full precision) and ``summary.md`` (the table, failed jobs with their errors,
means per input, metric definitions)."""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow.atomic import atomic_file
from tokenflow.evaluation.sweep import Sweep, short
from tokenflow.runs.record import is_number


def _md(value: Any) -> str:
    if value is None:
        return ""
    text = short(value) if is_number(value) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(sweep: Sweep) -> str:
    """The sweep as Markdown: the table, failed jobs with their errors, metric definitions."""
    cols = ["job", "status", *sweep.swept, *sweep.metrics]
    lines = [f"# Sweep {sweep.root}", "",
             f"{len(sweep.jobs)} jobs, {sum(not j.ok for j in sweep.jobs)} failed; swept: "
             + (", ".join(f"`{k}`" for k in sweep.swept) or "nothing"), "",
             "| " + " | ".join(_md(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in sweep.rows():
        lines.append("| " + " | ".join(_md(row[c]) for c in cols) + " |")
    failed = [j for j in sweep.jobs if not j.ok]
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- job {j.name} ({', '.join(f'{k}={short(sweep.value(j, k))}' for k in sweep.swept)}): "
                  f"{j.status}: {j.error or 'no error recorded'}" for j in failed]
    groups = sweep.groups()
    if len(groups) > 1:  # a dataset (or several videos): each input's mean of every metric over its finished jobs
        cols = ["input", "jobs", "failed", *sweep.metrics]
        lines += ["", "## By input (mean over finished jobs)", "", "| " + " | ".join(_md(c) for c in cols) + " |",
                  "|" + "---|" * len(cols)]
        for group, jobs in groups.items():
            means = [_mean([j.metrics.get(m) for j in jobs if j.ok]) for m in sweep.metrics]
            row = [group, len(jobs), sum(not j.ok for j in jobs), *means]
            lines.append("| " + " | ".join(_md(v) for v in row) + " |")
    definitions = sweep.definitions()
    if definitions:
        lines += ["", "## Metric definitions", ""] + [f"- `{k}`: {_md(v)}" for k, v in definitions.items()]
    return "\n".join(lines) + "\n"


def _mean(values: Sequence[Any]) -> float | None:
    finite = [float(v) for v in values if is_number(v) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def write_table(sweep: Sweep, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.csv`` (full precision, empty = absent) and ``summary.md``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["job", "status", *sweep.swept, *sweep.metrics, "error"]
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with atomic_file(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for row in sweep.rows():
            writer.writerow({k: ("" if row[k] is None else row[k] if is_number(row[k]) or isinstance(row[k], str)
                                 else json.dumps(row[k])) for k in cols})
    with atomic_file(md_path) as tmp:
        tmp.write_text(markdown(sweep))
    return csv_path, md_path
