"""Summaries of Hydra sweeps: a table of swept parameters against every metric, plots, contact sheets.

A multirun directory holds one job folder per job (``0``, ``1``, ...) with ``metrics.json`` (format:
status, error, task, overrides, metrics, definitions, info), ``config.yaml``, ``.hydra/overrides.yaml``
and, on success, ``edited.mp4`` / ``frames/`` and ``input.mp4``. :func:`load_sweep` reads it into a
:class:`Sweep` (swept parameters = override keys whose values differ across jobs); :func:`write_table`,
:func:`plot_metric` / :func:`write_plots` and :func:`contact_sheet` / :func:`write_contact_sheets` turn it
into CSV + Markdown, PNG plots and side-by-side PNG/mp4 sheets grouped by input (a dataset run's item, else the
video; with several inputs the Markdown adds a table of means per input). Failed jobs are
listed with their one-line error and never stop a summary. :func:`main` is ``tokenflow-summarize``.
Figures are :class:`matplotlib.figure.Figure` objects (no pyplot state).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenflow.errors import TokenFlowError, VideoError
from tokenflow.atomic import atomic_file, write_json
from tokenflow.storage.video import IMAGE_SUFFIXES, Video, write_video

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GROUP_KEY = "video"   # the run key that names the input clip; a dataset sweep groups its contact sheets by it
ITEM_KEY = "item"     # a dataset run, <item name>/<prompt index>: its item (one clip at one size) is its group
_INFO_KEYS = ("n_frames", "height", "width", "fps", "model", "keyframes")  # legacy flat metrics.json: not metrics


# --- reading run directories ----------------------------------------------------------------------


def read_native(path: str | Path) -> Video:
    """Frames of a video file or a folder of images at their stored size (no resizing), as a Video."""
    from PIL import Image

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VideoError(f"no frames in folder '{p}' — point at a video or a folder of png/jpg frames")
        frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        return Video(np.stack(frames), fps=10.0, source=str(p))
    import av

    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 10.0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (OSError, IndexError, av.error.FFmpegError) as e:
        raise VideoError(f"could not read video '{p}': {' '.join(str(e).split())[:200]} — check the file") from e
    if not frames:
        raise VideoError(f"video '{p}' has no frames — check the file")
    return Video(np.stack(frames), fps=fps, source=str(p))


def parse_overrides(lines: Sequence[str]) -> dict[str, Any]:
    """Hydra override strings (``editor.strength=0.8``, ``prompt='a fox'``) → {key: parsed value}."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, Any] = {}
    parser = OverridesParser.create()
    for line in lines:
        try:
            ov = parser.parse_overrides([line])[0]
            key = ov.key_or_group if ov.package is None else f"{ov.key_or_group}@{ov.package}"
            out[key] = None if ov.is_delete() else ov.value()
        except Exception:  # not Hydra syntax: keep it as text
            key, _, value = line.lstrip("+~").partition("=")
            out[key] = value
    return out


def override_line(key: str, value: Any) -> str:
    """One Hydra override string for ``key`` = ``value`` (strings quoted when needed)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif value is None:
        text = "null"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(override_line("k", v)[2:] for v in value) + "]"
    else:
        s = str(value)
        text = s if re.fullmatch(r"[\w./:-]+", s) else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={text}"


def is_run_dir(path: str | Path) -> bool:
    """A single run's folder (it has metrics.json, config.yaml or .hydra/overrides.yaml)."""
    p = Path(path)
    return any((p / name).is_file() for name in ("metrics.json", "config.yaml", ".hydra/overrides.yaml"))


def job_dirs(multirun: str | Path) -> list[Path]:
    """The job folders of a multirun directory, in job-number order."""
    root = Path(multirun)
    if not root.is_dir():
        raise VideoError(f"'{root}' is not a directory — point at a Hydra multirun directory")
    jobs = [d for d in root.iterdir() if d.is_dir() and is_run_dir(d)]
    return sorted(jobs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))


def load_record(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics.json in the current format (a legacy flat file is converted; a missing one gives
    status ``missing``); overrides fall back to ``.hydra/overrides.yaml``."""
    import yaml

    run = Path(run_dir)
    path = run / "metrics.json"
    if path.is_file():
        raw = json.loads(path.read_text())
    else:
        raw = {"status": "missing", "error": "no metrics.json — the job did not finish (killed or still running?)"}
    if "metrics" not in raw and "status" not in raw:  # the flat format of earlier versions
        metrics = {k: v for k, v in raw.items() if _number(v) and k not in _INFO_KEYS}
        raw = {"status": "ok", "error": None, "metrics": metrics,
               "info": {k: v for k, v in raw.items() if k not in metrics}}
    record = {"status": "ok", "error": None, "task": None, **raw}
    for key in ("overrides", "metrics", "definitions", "info"):
        record[key] = record.get(key) or {}
    hydra_overrides = run / ".hydra" / "overrides.yaml"
    if not record["overrides"] and hydra_overrides.is_file():
        record["overrides"] = parse_overrides(yaml.safe_load(hydra_overrides.read_text()) or [])
    return record


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- the sweep ----------------------------------------------------------------------------------


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
        return {k: v for k, v in (self.record.get("metrics") or {}).items() if _number(v)}

    def output(self) -> Path | None:
        """The edited frames: ``frames/`` (lossless) if present, else ``edited.mp4`` / ``reconstruction.mp4``."""
        frames = self.path / "frames"
        if frames.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in frames.iterdir()):
            return frames
        return next((p for p in (self.path / "edited.mp4", self.path / "reconstruction.mp4") if p.is_file()), None)

    def input(self) -> Path | None:
        p = self.path / "input.mp4"
        return p if p.is_file() else None

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
        lines = [f"#{job.name}"] + [f"{k}={_short(self.value(job, k))}" for k in self.swept if k not in skip]
        return "\n".join(lines)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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
        path = next((c for c in (p / "config.yaml", p / ".hydra" / "config.yaml") if c.is_file()), None)
        config = OmegaConf.to_container(OmegaConf.load(path)) if path is not None else {}
        jobs.append(Job(p, load_record(p), config if isinstance(config, dict) else {}))
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({_key(j.overrides.get(k)) for j in jobs}) > 1]
    metrics = list(dict.fromkeys(m for j in jobs if j.ok for m in j.metrics))
    return Sweep(root, jobs, swept, metrics)


# --- table --------------------------------------------------------------------------------------


def _md(value: Any) -> str:
    if value is None:
        return ""
    text = _short(value) if _number(value) else str(value)
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
        lines += [f"- job {j.name} ({', '.join(f'{k}={_short(sweep.value(j, k))}' for k in sweep.swept)}): "
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
    finite = [float(v) for v in values if _number(v) and math.isfinite(v)]
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
            writer.writerow({k: ("" if row[k] is None else row[k] if _number(row[k]) or isinstance(row[k], str)
                                 else json.dumps(row[k])) for k in cols})
    with atomic_file(md_path) as tmp:
        tmp.write_text(markdown(sweep))
    return csv_path, md_path


# --- plots --------------------------------------------------------------------------------------


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
        series = ", ".join(f"{k}={_short(sweep.value(job, k))}" for k in others) or metric
        xs.setdefault(_key(x), x)
        points.setdefault(series, {}).setdefault(_key(x), []).append(y)
    numeric = all(_number(x) for x in xs.values())
    order = sorted(xs, key=lambda k: xs[k]) if numeric else list(xs)
    position = {k: (xs[k] if numeric else i) for i, k in enumerate(order)}
    for series, values in points.items():
        keys = [k for k in order if k in values]
        ax.plot([position[k] for k in keys], [float(np.mean(values[k])) for k in keys], marker="o", label=series)
    if not numeric:
        ax.set_xticks(range(len(order)), [_short(xs[k]) for k in order])
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param}", fontsize=9)
    if len(points) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def write_plots(sweep: Sweep, out_dir: str | Path) -> list[Path]:
    """One PNG per (metric, swept parameter) under ``out_dir/plots``; returns their paths."""
    folder = Path(out_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in sweep.metrics:
        for param in sweep.swept:
            path = folder / f"{_safe(metric)}__vs__{_safe(param)}.png"
            with atomic_file(path, suffix=".png") as tmp:
                plot_metric(sweep, metric, param).savefig(tmp, dpi=100)
            paths.append(path)
    return paths


# --- contact sheets -----------------------------------------------------------------------------

_LINE = 11        # header text line height (px)
_BORDER = (255, 64, 64)


def _fit(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    if frame.shape[:2] == (h, w):
        return frame
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA if frame.shape[0] > h else cv2.INTER_LINEAR)


def _header(labels: Sequence[str], width: int) -> np.ndarray:
    """A dark band with each label (lines split on newlines, cut to the cell) over its cell."""
    import cv2

    n_lines = max((len(label.splitlines()) for label in labels), default=0)
    band = np.full((n_lines * _LINE + 4 if n_lines else 0, width * len(labels), 3), 24, np.uint8)
    chars = max(4, width // 6)
    for i, label in enumerate(labels):
        for j, line in enumerate(label.splitlines()):
            cv2.putText(band, line[:chars], (i * width + 2, (j + 1) * _LINE), cv2.FONT_HERSHEY_SIMPLEX, 0.33,
                        (235, 235, 235), 1, cv2.LINE_AA)
    return band


def grid(tiles: Sequence[np.ndarray], labels: Sequence[str], columns: int) -> np.ndarray:
    """Tiles (h, w, 3) uint8 of one size in rows of ``columns``, each row under a header of its tiles' labels."""
    h, w = tiles[0].shape[:2]
    rows = []
    for lo in range(0, len(tiles), columns):
        row = list(tiles[lo:lo + columns]) + [np.zeros((h, w, 3), np.uint8)] * (columns - len(tiles[lo:lo + columns]))
        names = list(labels[lo:lo + columns]) + [""] * (columns - len(labels[lo:lo + columns]))
        rows += [_header(names, w), np.concatenate(row, axis=1)]
    return np.concatenate(rows, axis=0)


def side_by_side(videos: Mapping[str, np.ndarray], frames: Sequence[int] | None = None, cell: int = 128,
                 highlight: Mapping[str, Sequence[int]] | None = None, n_frames: int = 4) -> np.ndarray:
    """A contact sheet: one column per video (labelled), one row per frame index (uint8 image).

    ``frames``: indices (default ``n_frames`` evenly spaced over the shortest video; indices past a
    video's end show its last frame). Cells are ``cell`` px wide, aspect of the first video.
    ``highlight``: per video label, frame indices to outline (e.g. keyframes).
    """
    import cv2

    clips = {k: np.asarray(getattr(v, "frames", v)) for k, v in videos.items()}
    first = next(iter(clips.values()))
    size = (max(2, round(cell * first.shape[1] / first.shape[2] / 2) * 2), cell)
    shortest = min(len(v) for v in clips.values())
    idx = list(frames) if frames is not None else sorted(set(np.linspace(0, shortest - 1, min(n_frames, shortest))
                                                             .round().astype(int).tolist()))
    tiles, labels = [], []
    for r, t in enumerate(idx):
        for c, (name, clip) in enumerate(clips.items()):
            tile = _fit(clip[min(t, len(clip) - 1)], size).copy()
            if t in (highlight or {}).get(name, ()):
                cv2.rectangle(tile, (1, 1), (size[1] - 2, size[0] - 2), _BORDER, 2)
            if c == 0:
                cv2.putText(tile, f"t={t}", (3, size[0] - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1,
                            cv2.LINE_AA)
            tiles.append(tile)
            labels.append(name if r == 0 else "")
    return grid(tiles, labels, len(clips))


def _group_videos(sweep: Sweep, jobs: Sequence[Job]) -> dict[str, np.ndarray]:
    """{"input": the group's input clip, <job label>: its output} for the jobs that have outputs."""
    videos: dict[str, np.ndarray] = {}
    fixed = [k for k in sweep.swept if len({_key(sweep.value(j, k)) for j in jobs}) == 1]  # same in the whole group
    for job in jobs:
        source, output = job.input(), job.output()
        if not job.ok or output is None:
            continue
        if "input" not in videos and source is not None:
            videos["input"] = read_native(source).frames
        videos[sweep.label(job, skip=(GROUP_KEY, *fixed))] = read_native(output).frames
    return videos


def contact_sheet(sweep: Sweep, group: str | None = None, cell: int = 128, n_frames: int = 4) -> np.ndarray:
    """Side-by-side sheet (uint8 image) of the input and every successful job's output for one input clip
    (``group``: a key of :meth:`Sweep.groups`; default the first)."""
    groups = sweep.groups()
    jobs = groups[group if group is not None else next(iter(groups))]
    videos = _group_videos(sweep, jobs)
    if not videos:
        raise VideoError(f"no job of group {group!r} in '{sweep.root}' has an output video — nothing to show")
    return side_by_side(videos, cell=cell, n_frames=n_frames)


def contact_video(videos: Mapping[str, np.ndarray], cell: int = 128, columns: int = 4) -> np.ndarray:
    """(T, H, W, 3) uint8: every video's frame t tiled (``columns`` per row, labelled), T = the longest
    video (shorter ones hold their last frame); H and W even, for H.264."""
    clips = list(videos.values())
    first = clips[0]
    size = (max(2, round(cell * first.shape[1] / first.shape[2] / 2) * 2), cell)
    cols = min(columns, len(clips))
    out = []
    for t in range(max(len(c) for c in clips)):
        frame = grid([_fit(c[min(t, len(c) - 1)], size) for c in clips], list(videos), cols)
        out.append(np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))))
    return np.stack(out)


def write_contact_sheets(sweep: Sweep, out_dir: str | Path, cell: int = 128, n_frames: int = 4,
                         video: bool = True) -> list[Path]:
    """``contact_<group>.png`` (and ``.mp4``) per input clip under ``out_dir``; returns their paths."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for group, jobs in sweep.groups().items():
        videos = _group_videos(sweep, jobs)
        if not videos:
            continue
        stem = _safe(Path(group).stem or group)
        png = out / f"contact_{stem}.png"
        if png in paths:  # two clips of the same name in different folders
            png = out / f"contact_{stem}_{hashlib.sha1(group.encode()).hexdigest()[:6]}.png"
        with atomic_file(png, suffix=".png") as tmp:
            Image.fromarray(side_by_side(videos, cell=cell, n_frames=n_frames)).save(tmp, format="PNG")
        paths.append(png)
        if video:
            fps = next((read_native(j.input()).fps for j in jobs if j.input() is not None), 10.0)
            paths.append(write_video(png.with_suffix(".mp4"), contact_video(videos, cell), fps))
    return paths


def write_summary(sweep: Sweep, out_dir: str | Path, cell: int = 128, n_frames: int = 4,
                  video: bool = True) -> dict[str, list[Path]]:
    """Table, plots and contact sheets of ``sweep`` under ``out_dir``."""
    csv_path, md_path = write_table(sweep, out_dir)
    return {"table": [csv_path, md_path], "plots": write_plots(sweep, out_dir),
            "contact_sheets": write_contact_sheets(sweep, out_dir, cell, n_frames, video)}


# --- a job folder, as tokenflow-edit -m writes it (for tests and in-process sweeps) --------------


def write_job(job_dir: str | Path, overrides: Mapping[str, Any], config: Mapping[str, Any] | None = None,
              metrics: Mapping[str, float] | None = None, definitions: Mapping[str, str] | None = None,
              source: np.ndarray | None = None, edited: np.ndarray | None = None, fps: float = 10.0,
              error: str | None = None, task: str = "edit", info: Mapping[str, Any] | None = None) -> Path:
    """Write one job folder in the multirun layout: metrics.json, config.yaml, .hydra/overrides.yaml and,
    when given, input.mp4 / edited.mp4. ``error`` set → status ``failed``. Returns the folder."""
    import yaml

    job = Path(job_dir)
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    lines = [override_line(k, v) for k, v in overrides.items()]
    with atomic_file(job / ".hydra" / "overrides.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(lines))
    with atomic_file(job / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(dict(config or {}), sort_keys=False))
    if source is not None:
        write_video(job / "input.mp4", source, fps)
    if edited is not None:
        write_video(job / "edited.mp4", edited, fps)
    write_json(job / "metrics.json", {
        "status": "failed" if error else "ok", "error": error, "task": task, "overrides": dict(overrides),
        "metrics": dict(metrics or {}), "definitions": dict(definitions or {}), "info": dict(info or {})})
    return job


def main(argv: Sequence[str] | None = None) -> int:
    """``tokenflow-summarize MULTIRUN_DIR [--out DIR] [--cell PX] [--frames N] [--no-video]``."""
    parser = argparse.ArgumentParser(prog="tokenflow-summarize", description="Summarise a Hydra sweep: table of "
                                     "swept parameters against every metric (CSV, Markdown), plots, contact sheets.")
    parser.add_argument("multirun", type=Path, help="a multirun directory, e.g. multirun/edit/<date>/<time>")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <multirun>/summary)")
    parser.add_argument("--cell", type=int, default=128, help="contact-sheet cell width in pixels")
    parser.add_argument("--frames", type=int, default=4, help="frames per contact sheet")
    parser.add_argument("--no-video", action="store_true", help="skip the contact-sheet mp4s")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        sweep = load_sweep(args.multirun)
        out = args.out or args.multirun / "summary"
        written = write_summary(sweep, out, args.cell, args.frames, not args.no_video)
    except TokenFlowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = sum(not j.ok for j in sweep.jobs)
    print(f"{len(sweep.jobs)} jobs ({failed} failed), swept: {', '.join(sweep.swept) or 'nothing'}; "
          f"{len(written['plots'])} plots, {len(written['contact_sheets'])} contact sheet files → {out}")
    return 0
