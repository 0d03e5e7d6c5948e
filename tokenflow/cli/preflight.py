"""Checks before any model work: settings, the clip's header and output size, memory, the cache folder.

Everything here fails (one line, :class:`~tokenflow.errors.TokenFlowError`) or warns before frames
are decoded or a UNet runs, so impossible runs stop in seconds instead of at the allocator or encoder.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokenflow.core.memory import (MemoryEstimate, ModelShape, RunShape, check_memory, current_rss,
                                   free_device_memory, free_host_memory, length_growth)
from tokenflow.errors import ConfigError, VideoError
from tokenflow.atomic import remove_stale, temp_path
from tokenflow.sizing import target_size
from tokenflow.storage.decoders import VideoInfo, probe_video
from tokenflow.storage.mp4 import H264_MAX_SIDE

log = logging.getLogger("tokenflow")
ASPECT_TOLERANCE = 0.03  # default sizing that changes the aspect ratio by more than this is reported
LENGTH_GROWTH_WARNING = 1.2  # warn when the estimated peak exceeds the same run's on BASE_FRAMES by this factor
BASE_FRAMES = 24
MB = 1 << 20


def check_settings(cfg: DictConfig) -> None:
    """Ranges of the run keys and no unknown top-level key (``+foo=1`` is refused, not ignored)."""
    from tokenflow.cli.config import RunConfig, validate_run

    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = [k for k in cfg if k not in known]
    if unknown:
        raise ConfigError(f"{unknown[0]}={cfg.get(unknown[0])}: tokenflow has no setting {unknown[0]!r} — check the "
                          f"spelling (settings: {', '.join(sorted(known))})")
    validate_run(cfg)
    bad = next(nonfinite_settings(OmegaConf.to_container(cfg, resolve=True)), None)
    if bad is not None:
        raise ConfigError(f"{bad[0]}={bad[1]} is not a finite number — give a real value")


def nonfinite_settings(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(key, value) of every NaN or infinite float in a resolved config (nested keys dotted, list items [i])."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            yield name, value
        else:
            yield from nonfinite_settings(value, name)


def video_path(value: str | None) -> str:
    """``video=`` as a path: ``sample`` (or unset) is the clip embedded in the package."""
    from tokenflow.samples import SAMPLE_DESCRIPTION, is_sample, sample_video_path

    if is_sample(value):
        print(f"video: the embedded sample clip ({SAMPLE_DESCRIPTION}) — set video=path/to/clip.mp4 for your own")
        return str(sample_video_path())
    return str(value)


@dataclass(frozen=True)
class SizePlan:
    """The clip's header and what the run will read: frame count (None if unknown) and output size."""

    source: VideoInfo
    n_frames: int | None
    height: int
    width: int


def plan_size(cfg: DictConfig, path: str) -> SizePlan:
    """Read the clip's header, fix the output size and frame count (refusing more frames than it has), and
    warn when default sizing changes the aspect ratio by more than ``ASPECT_TOLERANCE``."""
    info = probe_video(path)
    h, w = target_size(info.height, info.width, cfg.height, cfg.width)
    if cfg.height is None or cfg.width is None:
        change = (w / h) / (info.width / info.height) - 1
        if abs(change) > ASPECT_TOLERANCE:
            log.warning("default sizing maps the %dx%d clip to %dx%d (multiples of 64): the aspect ratio changes by "
                        "%+.0f%% — set height= and width= to choose the size", info.height, info.width, h, w,
                        100 * change)
    n = None
    if info.n_frames:
        n = len(range(0, info.n_frames, cfg.frame_stride))
        if cfg.n_frames is not None and n < cfg.n_frames:
            needs = (cfg.n_frames - 1) * cfg.frame_stride + 1
            raise VideoError(f"video '{path}' has {info.n_frames} frames; n_frames={cfg.n_frames} with frame_stride "
                             f"{cfg.frame_stride} needs {needs} — lower n_frames or frame_stride")
        n = min(n, cfg.n_frames) if cfg.n_frames is not None else n
        if cfg.get("round_frames_down"):
            n -= n % cfg.keyframe_stride
    return SizePlan(info, n if n else None, h, w)


def run_shape(cfg: DictConfig, model: Any, plan: SizePlan, n_frames: int, inverter: Any, editor: Any = None,
              propagator: Any = None, keyframes: Any = None, attention: Any = None) -> RunShape:
    """The :class:`RunShape` of this run (edit parts None for ``tokenflow-invert``)."""
    from tokenflow.core.inversion import kept_timesteps

    factor = model.vae_scale_factor
    kept = len(set(kept_timesteps(inverter, model, (plan.height // factor, plan.width // factor))))
    if editor is not None and not getattr(editor, "needs_inversion", True):
        kept = 0  # inversion-free: no trajectory
    config = getattr(inverter, "config", None)
    batch = int(getattr(config, "batch_size", cfg.chunk_size))
    if editor is None:  # invert + reconstruct: one branch, no keyframes
        return RunShape(n_frames, plan.height, plan.width, kept, 1, 0, batch, batch, model.vae_batch,
                        model.device.type == "cuda")
    joint, held, anchors = keyframe_counts(keyframes.bound(cfg.n_steps, n_frames) if propagator.uses_keyframes else 0,
                                           attention)
    keep_frames = bool(cfg.get("metrics") and any(k != "_target_" for k in cfg.metrics))  # scored: frames gathered
    return RunShape(n_frames, plan.height, plan.width, kept, branches_per_frame(model, editor, propagator), joint, cfg.chunk_size, batch,
                    model.vae_batch, model.device.type == "cuda", held_keyframes=held, anchors=anchors,
                    keep_frames=keep_frames)


def keyframe_counts(keyframes: int, attention: Any = None) -> tuple[int, int, int]:
    """(keyframes edited jointly in one call, keyframes whose tokens are held, anchors) for a step with
    ``keyframes`` keyframes under ``attention`` (anchors jointly, then segments of keyframes when bounded)."""
    joint = held = int(keyframes)
    anchors = 0
    if attention is not None and attention.bounded and joint:
        anchors = min(attention.anchors, joint)
        held = min(joint, attention.segment + anchors + 1)
        joint = anchors
    return joint, held, anchors


def recheck_keyframes(model: Any, shape: RunShape, schedule: list[list[int]], attention: Any = None,
                      what: str = "") -> RunShape:
    """After a data-dependent keyframe schedule is drawn (adaptive clips): refuse the run, as before it started, if
    its most keyframes in a step exceed what the preflight assumed and the estimate no longer fits; the shape the
    run has."""
    most = max((len(k) for k in schedule), default=0)
    joint, held, anchors = keyframe_counts(most, attention)
    if joint <= shape.keyframes and held <= (shape.held_keyframes or shape.keyframes) and anchors <= shape.anchors:
        return shape
    actual = dataclasses.replace(shape, keyframes=joint, held_keyframes=held, anchors=anchors)
    log.info("the adaptive cut gave %d keyframes per step (the preflight assumed %d): estimate checked again", most,
             shape.held_keyframes or shape.keyframes)
    check_run_memory(model, actual, f"{what}, {most} keyframes per step" if what else f"{most} keyframes per step")
    return actual


def branches_per_frame(model: Any, editor: Any, propagator: Any) -> int:
    """Model evaluations per frame at an editing step: the editor's branches, with the source branch when the
    editor or the propagator reads it."""
    return int(editor.branch_count(model, bool(editor.needs_source or propagator.needs_source)))


def check_run_memory(model: Any, shape: RunShape, what: str = "") -> tuple[MemoryEstimate, dict[str, float]]:
    """Refuse a run whose estimated peak does not fit, or whose frames the encoder refuses (one line: the
    estimate, what is free, the largest size that fits); else the estimate and the estimated peaks in MiB
    (process RSS now + the run's addition)."""
    model_shape = ModelShape.from_model(model)
    estimate = check_memory(model_shape, shape, free_host_memory(), free_device_memory(model.device), what,
                            max_side=H264_MAX_SIDE)
    held = current_rss()
    peaks = {"estimated_peak_rss_mb": (held + estimate.host_bytes) / MB}
    if shape.cuda:
        import torch

        held = torch.cuda.memory_allocated(model.device)
        peaks["estimated_peak_cuda_mb"] = (held + estimate.device_bytes) / MB
    warn_length_growth(model_shape, shape, held, what)
    return estimate, peaks


def warn_length_growth(model_shape: ModelShape, shape: RunShape, held: int, what: str = "") -> float:
    """Warn when the run's estimated peak (``held`` + its addition) is more than ``LENGTH_GROWTH_WARNING`` times
    the same run's on ``BASE_FRAMES`` frames and its keyframe attention is unbounded, naming the long-video
    preset as the fix; returns the ratio."""
    growth = length_growth(model_shape, shape, BASE_FRAMES, held)
    if growth > LENGTH_GROWTH_WARNING and not shape.anchors:
        where = "GPU memory" if shape.cuda else "memory"
        log.warning("%s: the estimated peak %s is %.1fx that of %d frames and grows with the length (every keyframe "
                    "attends to all %d keyframes) — for long videos use experiment=long_video (bounded keyframe "
                    "attention, metrics scored afterwards)", what or f"{shape.n_frames} frames", where, growth,
                    BASE_FRAMES, shape.keyframes)
    return growth


def size_phrase(cfg: DictConfig, plan: SizePlan, n_frames: int) -> str:
    """How the run's size came about, for messages: ``height=8192 width=8192`` or the default sizing."""
    given = [f"{k}={cfg.get(k)}" for k in ("height", "width") if cfg.get(k) is not None]
    if len(given) == 2:
        return f"{n_frames} frames at {' '.join(given)}"
    how = f"{' '.join(given)} and default sizing" if given else "default sizing"
    return f"{n_frames} frames at {plan.height}x{plan.width} ({how} of a {plan.source.height}x{plan.source.width} clip)"


def open_cache(cfg: DictConfig):
    """The inversion cache, or None (``use_cache=false``, or a folder that cannot be written: warned)."""
    from tokenflow.paths import default_cache_dir
    from tokenflow.storage.cache import InversionCache

    if not cfg.use_cache:
        return None
    folder = Path(cfg.cache_dir or default_cache_dir()) / "inversions"
    problem = writable(folder)
    if problem:
        log.warning("the inversion cache folder %s cannot be written (%s) — running without the cache; set "
                    "cache_dir= to a writable folder", folder, problem)
        return None
    cache = InversionCache(folder)
    cache.remove_stale()
    return cache


def writable(folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (created if missing), else the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def remove_leftovers(cfg: DictConfig, run_dir: Path) -> None:
    """Delete temporaries of killed runs: in the cache's model folder and in the runs beside this one."""
    from tokenflow.paths import default_cache_dir

    remove_stale(Path(cfg.cache_dir or default_cache_dir()) / "models")
    remove_stale(run_dir.parent, depth=2)


def frames_to_check(plan: SizePlan, cfg: DictConfig) -> int:
    """Frames for the memory check before reading: the header's count, else n_frames, else 1 (rechecked later)."""
    return plan.n_frames or cfg.n_frames or 1




def quiet_progress_bars() -> None:
    """``progress=false`` also silences the weight-loading bars of transformers and diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
