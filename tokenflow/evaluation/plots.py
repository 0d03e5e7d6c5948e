"""A sweep's metrics plotted against its swept parameters (:class:`matplotlib.figure.Figure`, no pyplot state)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenflow.atomic import atomic_file
from tokenflow.evaluation.sweep import Sweep, safe_name, short, value_key
from tokenflow.runs.record import is_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_metric(sweep: Sweep, metric: str, param: str, fig: "Figure | None" = None) -> "Figure":
    """``metric`` against swept ``param``: one line per combination of the other swept parameters.

    Numeric parameters get a numeric axis, others one tick per value in first-seen order; failed jobs
    and missing values are left out; jobs sharing a point are averaged.
    """
    from matplotlib.figure import Figure

    fig = fig or Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    others = [k for k in sweep.swept if k != param]
    points: dict[str, dict[str, list[float]]] = {}
    xs: dict[str, Any] = {}
    for job in sweep.jobs:
        y = job.metrics.get(metric)
        if not job.ok or y is None or not math.isfinite(y):
            continue
        x = sweep.value(job, param)
        series = ", ".join(f"{k}={short(sweep.value(job, k))}" for k in others) or metric
        xs.setdefault(value_key(x), x)
        points.setdefault(series, {}).setdefault(value_key(x), []).append(y)
    numeric = all(is_number(x) for x in xs.values())
    order = sorted(xs, key=lambda k: xs[k]) if numeric else list(xs)
    position = {k: (xs[k] if numeric else i) for i, k in enumerate(order)}
    for series, values in points.items():
        keys = [k for k in order if k in values]
        ax.plot([position[k] for k in keys], [float(np.mean(values[k])) for k in keys], marker="o", label=series)
    if not numeric:
        ax.set_xticks(range(len(order)), [short(xs[k]) for k in order])
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param}", fontsize=9)
    if len(points) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def write_plots(sweep: Sweep, out_dir: str | Path) -> list[Path]:
    """One PNG per (metric, swept parameter) under ``out_dir/plots``; returns their paths."""
    folder = Path(out_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in sweep.metrics:
        for param in sweep.swept:
            path = folder / f"{safe_name(metric)}__vs__{safe_name(param)}.png"
            with atomic_file(path, suffix=".png") as tmp:
                plot_metric(sweep, metric, param).savefig(tmp, dpi=100)
            paths.append(path)
    return paths
