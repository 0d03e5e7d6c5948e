"""Console scripts ``tokenflow-invert`` and ``tokenflow-edit``: thin Hydra layers over the Python API.

Each run writes into its Hydra run dir: ``config.yaml`` (resolved), ``input.mp4``, ``edited.mp4`` (or
``reconstruction.mp4``), ``frames/`` and ``metrics.json``.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from tokenflow.errors import TokenFlowError
from tokenflow.storage.atomic import write_json

log = logging.getLogger("tokenflow")


def _prepare(cfg: DictConfig):
    """Validate the run keys, load the model and read the video."""
    from tokenflow.cli.config import build, validate_run
    from tokenflow.storage.video import read_video, round_frames_down

    validate_run(cfg)
    video = read_video(_video_path(cfg.video), n_frames=cfg.n_frames, stride=cfg.frame_stride, height=cfg.height, width=cfg.width)
    if cfg.get("round_frames_down"):
        kept = round_frames_down(video, cfg.keyframe_stride)
        if kept.n_frames != video.n_frames:
            log.info("round_frames_down: using %d of %d frames", kept.n_frames, video.n_frames)
        video = kept
    return build(cfg.model), video


def _video_path(value: str | None) -> str:
    """``video=`` as a path: ``sample`` (or unset) is the clip embedded in the package."""
    from tokenflow.samples import SAMPLE_DESCRIPTION, is_sample, sample_video_path

    if is_sample(value):
        path = sample_video_path()
        print(f"video: the embedded sample clip ({SAMPLE_DESCRIPTION}) — set video=path/to/clip.mp4 for your own")
        return str(path)
    return str(value)


def _cache(cfg: DictConfig):
    from tokenflow.storage.cache import InversionCache
    from tokenflow.paths import default_cache_dir

    if not cfg.use_cache:
        return None
    return InversionCache(Path(cfg.cache_dir or default_cache_dir()) / "inversions")


def _outputs(cfg: DictConfig) -> Path:
    out = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return out


def run_invert(cfg: DictConfig) -> dict[str, Any]:
    """Invert and reconstruct; report PSNR of the reconstruction."""

    from tokenflow.cli.config import build
    from tokenflow.core.inversion import reconstruct
    from tokenflow.evaluation.metrics import psnr
    from tokenflow.core.pipeline import invert_video
    from tokenflow.storage.video import frames_from_tensor, write_frames, write_video

    out = _outputs(cfg)
    t0 = time.perf_counter()
    model, video = _prepare(cfg)
    inverter = build(cfg.inverter)
    write_video(out / "input.mp4", video.frames, video.fps)
    t1 = time.perf_counter()
    inversion, hit = invert_video(model, video, inverter, cfg.inversion_prompt, _cache(cfg), cfg.progress)
    t2 = time.perf_counter()
    latents = reconstruct(model, inversion, progress=cfg.progress)
    recon = frames_from_tensor(model.decode_latents(latents))
    vae_only = frames_from_tensor(model.decode_latents(inversion.clean))
    t3 = time.perf_counter()
    write_video(out / "reconstruction.mp4", recon, video.fps)
    write_frames(out / "frames", recon)
    metrics = {
        "psnr_reconstruction_vs_input": psnr(recon, video.frames),
        "psnr_vae_only_vs_input": psnr(vae_only, video.frames),
        "psnr_reconstruction_vs_vae_only": psnr(recon, vae_only),
        "latent_relative_error": float((latents - inversion.clean).norm() / inversion.clean.norm()),
        "inversion_cache_hit": hit, "n_frames": video.n_frames, "height": video.height, "width": video.width,
        "fps": video.fps, "inversion_s": t2 - t1, "reconstruction_s": t3 - t2, "total_s": time.perf_counter() - t0,
        "model": model.identity,
    }
    write_json(out / "metrics.json", metrics)
    print(f"inverted {video.n_frames} frames at {video.height}x{video.width} in {metrics['total_s']:.1f}s "
          f"(cache {'hit' if hit else 'miss'}); reconstruction PSNR {metrics['psnr_reconstruction_vs_input']:.2f} dB "
          f"vs input, {metrics['psnr_reconstruction_vs_vae_only']:.2f} dB vs VAE-only → {out}")
    return metrics


def run_edit(cfg: DictConfig) -> dict[str, Any]:
    """The TokenFlow edit; writes edited.mp4, frames/ and metrics.json."""
    from tokenflow.cli.config import build, negative_prompt
    from tokenflow.evaluation.metrics import warp_error
    from tokenflow.core.pipeline import TokenFlowPipeline
    from tokenflow.storage.video import write_frames, write_video

    out = _outputs(cfg)
    t0 = time.perf_counter()
    model, video = _prepare(cfg)
    inverter = build(cfg.inverter)
    pipe = TokenFlowPipeline(model, build(cfg.editor), build(cfg.propagator), build(cfg.keyframes),
                             inverter, n_steps=cfg.n_steps, chunk_size=cfg.chunk_size, cache=_cache(cfg))
    write_video(out / "input.mp4", video.frames, video.fps)
    result = pipe(video, cfg.prompt, negative_prompt(cfg, inverter), cfg.inversion_prompt, progress=cfg.progress)
    write_video(out / "edited.mp4", result.frames, video.fps)
    write_frames(out / "frames", result.frames)
    metrics: dict[str, Any] = {**result.timings, "unet_evaluations": result.unet_evaluations,
                               "n_frames": video.n_frames, "height": video.height, "width": video.width,
                               "fps": video.fps, "model": model.identity, "keyframes": result.keyframes}
    if cfg.warp_metric and video.n_frames > 1:
        w = warp_error(result.frames, video.frames)
        metrics[w["metric_name"]] = w["warp_error"]
        metrics["warp_occluded_fraction"] = w["occluded_fraction"]
    metrics["total_s"] = time.perf_counter() - t0
    write_json(out / "metrics.json", metrics)
    print(f"edited {video.n_frames} frames at {video.height}x{video.width} in {metrics['total_s']:.1f}s "
          f"({result.unet_evaluations} UNet evaluations) → {out / 'edited.mp4'}")
    return metrics


def _guarded(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Print actionable errors as one line (exit 2) unless ``verbose=true``."""
    def wrapper(cfg: DictConfig) -> Any:
        logging.getLogger("tokenflow").setLevel(logging.INFO)
        try:
            return fn(cfg)
        except (TokenFlowError, MissingMandatoryValue) as e:
            if cfg.get("verbose", False):
                raise
            print(f"error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)
    wrapper.__name__ = fn.__name__
    return wrapper


def _one_line(error: Exception) -> str:
    """The user-facing line of an error; a missing mandatory value names the key and the fix."""
    if isinstance(error, MissingMandatoryValue):
        key = getattr(error, "full_key", None) or "?"
        return f"{key} is not set — give it on the command line, e.g. {key}=..." + (
            " (video=sample runs on the embedded clip)" if key == "video" else "")
    return str(error)


def _hydra_entry(config_name: str, fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    import tokenflow.cli.config  # noqa: F401  registers the run schema

    return hydra.main(version_base="1.3", config_path="pkg://tokenflow.conf", config_name=config_name)(_guarded(fn))


def invert_main() -> Any:
    return _hydra_entry("invert", run_invert)()


def edit_main() -> Any:
    return _hydra_entry("edit", run_edit)()
