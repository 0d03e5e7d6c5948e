"""Contact sheets of a sweep: the input and every job's output side by side, per input clip (PNG and mp4)."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tokenflow.atomic import atomic_file
from tokenflow.errors import VideoError
from tokenflow.evaluation.sweep import GROUP_KEY, Job, Sweep, safe_name, value_key
from tokenflow.runs.outputs import read_native
from tokenflow.storage.mp4 import write_video

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
    fixed = [k for k in sweep.swept if len({value_key(sweep.value(j, k)) for j in jobs}) == 1]  # same in the whole group
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
        stem = safe_name(Path(group).stem or group)
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
