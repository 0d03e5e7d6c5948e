"""Score a finished run folder again (no editing) and merge the values into its metrics.json."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tokenflow.errors import ConfigError, VideoError
from tokenflow.evaluation.interface import MetricSuite
from tokenflow.evaluation.suites import DEFAULT_SUITE, build_suite, suite_from_data, with_overrides
from tokenflow.runs.layout import CONFIG
from tokenflow.runs.outputs import input_path, output_path, read_native
from tokenflow.runs.record import load_record, write_record


def load_masks(path: str | Path, n: int, hw: tuple[int, int]) -> np.ndarray:
    """(n, H, W) bool object masks from a folder of images or a video (nonzero / > 127 gray = object), resized
    to ``hw`` (nearest) and cut to the first ``n`` frames."""
    import cv2

    frames = read_native(path).frames
    if len(frames) < n:
        raise VideoError(f"masks '{path}' have {len(frames)} frames, the video {n} — give one mask per frame")
    out = np.stack([cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
                    for f in frames[:n]])
    return out > 127


def recompute(run_dir: str | Path, metrics: MetricSuite | str | Mapping | None = None, masks: Any = None,
              prompt: str | None = None, overrides: Sequence[str] = (), device: str | None = None) -> dict[str, Any]:
    """Score a finished run again (no editing) and merge the values into its metrics.json (atomically).

    Reads ``frames/`` (lossless PNGs) or else ``edited.mp4`` / ``reconstruction.mp4`` as the edit and
    ``input.mp4`` as the source (H.264: warp errors move by ~1e-4 against in-run values); ``prompt``
    defaults to config.yaml's; ``masks``: an array or a path (folder of images / video). ``metrics``: a
    suite, a suite spec for :func:`build_suite`, or None for the run's own ``metrics`` config node (else
    ``default``). Returns the updated metrics.json record.
    """
    from omegaconf import OmegaConf

    run = Path(run_dir)
    cfg = OmegaConf.to_container(OmegaConf.load(run / CONFIG)) if (run / CONFIG).is_file() else {}
    record = load_record(run)
    if record.get("status") == "failed":
        raise ConfigError(f"run '{run}' failed ({record.get('error')}) — there is no output to score")
    if record.get("status") == "missing":  # outputs are published on success only: the run did finish
        record.update(status="ok", error=None)
    edited_path, source_path = output_path(run), input_path(run)
    if edited_path is None or source_path is None:
        raise VideoError(f"run '{run}' has no frames/ or edited.mp4 and input.mp4 — point at a finished run directory")
    source, edited = read_native(source_path), read_native(edited_path)
    if not isinstance(metrics, MetricSuite):
        context = {"device": device or cfg.get("device") or "auto", "cache_dir": cfg.get("cache_dir")}
        if metrics is None and cfg.get("metrics") is not None:  # the run's own: data, rebuilt by name
            metrics = suite_from_data(with_overrides(cfg["metrics"], overrides), context, f"{run}/config.yaml: metrics")
        else:  # what the user named (an option of conf/metrics or a YAML file of theirs)
            metrics = build_suite(metrics if metrics is not None else DEFAULT_SUITE, overrides, context)
    if masks is not None and not isinstance(masks, np.ndarray):
        masks = load_masks(masks, source.n_frames, (source.height, source.width))
    text = cfg.get("prompt", "") if prompt is None else prompt
    scores = metrics.evaluate(edited, source, text or "", masks)
    scores.merge_into(record)
    record["info"]["recomputed_metrics"] = list(scores.values)
    record["info"]["metrics_recomputed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_record(run, record)
    return record
