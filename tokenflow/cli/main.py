"""Console scripts ``tokenflow-invert`` and ``tokenflow-edit``: thin Hydra layers over the Python API.

Each run gets its own folder (claimed with an exclusive mkdir, see :mod:`tokenflow.cli.rundir`) with
``config.yaml`` (resolved), ``manifest.json`` (provenance: code, packages, device, input hash, model
identity, seed), ``metrics.json`` (:mod:`tokenflow.runs.record`) and, on success only,
``input.mp4``, ``edited.mp4`` (or ``reconstruction.mp4``) and ``frames/``. Every user error, from
Hydra or from tokenflow, is one line on stderr and exit status 2 (``verbose=true``: the traceback);
in a sweep a failing job records its error and the sweep goes on, then the process exits 2 with one
line per failed job.

Sweeps: the jobs one process runs (all of them with the basic launcher, a worker's share with
joblib) reuse the loaded model (:class:`~tokenflow.cli.config.ModelMemo`, ``model_reused`` in
metrics.json) and, through the inversion cache, one inversion per video; ``dataset=`` runs every
item x prompt of a manifest (:mod:`tokenflow.cli.dataset`). The task function and its session pickle,
so the joblib and submitit launchers run the same jobs in other processes.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) the N processes edit one video together
(:mod:`tokenflow.core.distributed`: the inversion by frame chunks, the edit's chunk passes): rank 0
alone writes the run folder, the cache and the metrics; the other ranks keep Hydra's files in a
temporary folder they remove, and write nothing. Rank 0 publishes only after every rank has finished
its part (a barrier a failed rank never reaches); sweeps (``-m``) are refused.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import tokenflow.cli.config  # noqa: F401  registers the run schema
from tokenflow.cli import preflight
from tokenflow.cli.config import ModelMemo, register_sweep_resolvers
from tokenflow.cli.dataset import apply_item, register_manifest_files
from tokenflow.cli.messages import hydra_save_failure, user_error
from tokenflow.cli.plugins import make_cwd_importable, register_class_options
from tokenflow.cli.report import SweepFailed, save_config
from tokenflow.cli.rundir import claimed_run_dir_args, register_resolvers, scratch_run_dir_args
from tokenflow.core.distributed import Ranks, RankStopped, init_from_environment, leave_group
from tokenflow.errors import ConfigError
from tokenflow.evaluation.provenance import run_manifest, write_manifest
from tokenflow.runs.overrides import parse_overrides
from tokenflow.runs.report import RunReport

log = logging.getLogger("tokenflow")
RunFunction = Callable[[DictConfig, Path, RunReport, ModelMemo], None]
MODEL_REUSED = "1 when this job used the model an earlier job of the same process loaded (model_memo), 0 when loaded"
MODEL_LOAD_S = "wall seconds to obtain the model (load and fingerprint, or the kept one on reuse)"
INVERSION_FRAMES = "frames this process inverted (0 on a cache hit; under torchrun rank 0's share, info.ranks has all)"
WORLD_SIZE = "processes that edited this video together (torchrun --nproc-per-node)"
SWEEP_FLAGS = ("-m", "--multirun", "hydra.mode=MULTIRUN")

# the resolvers edit.yaml and the sweep files use; registered on import too, so that a launcher's worker
# process (joblib/loky, submitit), which imports this module to unpickle the task function, has them
register_resolvers()
register_sweep_resolvers()


def _prepare(cfg: DictConfig, report: RunReport, run_dir: Path, parts: Callable[[], dict[str, Any]],
             models: ModelMemo | None = None):
    """Settings, the clip's header, the run's parts, the model and the memory check; then read the video.

    ``parts()`` builds the run's inverter (and editor, propagator, keyframes); ``models`` keeps loaded models
    for the next job (None: load). Returns (model, video, parts, the run shape the memory check accepted).
    """
    from tokenflow.storage.video import read_video

    ranks = Ranks.current()
    preflight.check_settings(cfg)
    if ranks.main:
        preflight.remove_leftovers(cfg, run_dir)
    path = preflight.video_path(cfg.video)
    plan = preflight.plan_size(cfg, path)
    built = parts()
    if not cfg.progress:
        preflight.quiet_progress_bars()
    t0 = time.perf_counter()
    model, reused = (models if models is not None else ModelMemo(0)).get(cfg.model, cfg.get("model_memo", 1))
    report.metric("model_reused", float(reused), MODEL_REUSED)
    report.metric("model_load_s", time.perf_counter() - t0, MODEL_LOAD_S)
    n = preflight.frames_to_check(plan, cfg)
    shape = preflight.run_shape(cfg, model, plan, n, **built)
    estimate, peaks = preflight.check_run_memory(model, shape, preflight.size_phrase(cfg, plan, n))
    video = read_video(path, n_frames=cfg.n_frames, stride=cfg.frame_stride, height=cfg.height, width=cfg.width)
    if cfg.get("round_frames_down"):
        from tokenflow.sizing import round_frames_down

        kept = round_frames_down(video, cfg.keyframe_stride)
        if kept.n_frames != video.n_frames:
            log.info("round_frames_down: using %d of %d frames", kept.n_frames, video.n_frames)
        video = kept
    if video.n_frames != n:  # the header had no (or a wrong) frame count: check again with the real one
        shape = preflight.run_shape(cfg, model, plan, video.n_frames, **built)
        estimate, peaks = preflight.check_run_memory(model, shape, preflight.size_phrase(cfg, plan, video.n_frames))
    for name, value in peaks.items():
        report.metric(name, value)
    if ranks.main:
        write_manifest(run_dir, run_manifest(cfg, model=model, video=video, seed=cfg.seed, command=report.command,
                                             started_at=report.started))
    report.info.update({"video": path, "n_frames": video.n_frames, "height": video.height, "width": video.width,
                        "fps": video.fps, "source_size": [plan.source.height, plan.source.width],
                        "model": model.identity, "model_fingerprint": model.fingerprint,
                        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                        "memory_estimate": estimate.as_dict()})
    return model, video, built, shape


def _open_cache(cfg: DictConfig, ranks: Ranks):
    """The inversion cache as this process uses it: rank 0 opens it (checked, cleaned, written); another rank
    only reads the entries rank 0 verified (:func:`~tokenflow.core.video_inversion.invert_video`), never writes there."""
    if ranks.main:
        return preflight.open_cache(cfg)
    if not cfg.use_cache:
        return None
    from tokenflow.paths import default_cache_dir
    from tokenflow.storage.cache import InversionCache

    return InversionCache(Path(cfg.cache_dir or default_cache_dir()) / "inversions")


def run_invert(cfg: DictConfig, out: Path, report: RunReport, models: ModelMemo | None = None) -> None:
    """Invert and reconstruct; report PSNR of the reconstruction."""
    from tokenflow.instantiation import build
    from tokenflow.core.inversion import reconstruct
    from tokenflow.core.video_inversion import invert_video
    from tokenflow.evaluation.metrics import psnr
    from tokenflow.storage.mp4 import write_video
    from tokenflow.storage.png import write_frames
    from tokenflow.storage.video import frames_from_tensor

    t0 = time.perf_counter()
    ranks = Ranks.current()
    model, video, parts, _ = _prepare(cfg, report, out, lambda: {"inverter": build(cfg.inverter)}, models)
    t1 = time.perf_counter()
    inversion, hit = invert_video(model, video, parts["inverter"], cfg.inversion_prompt, _open_cache(cfg, ranks),
                                  cfg.progress)
    t2 = time.perf_counter()
    if not ranks.main:  # the reconstruction and its outputs are rank 0's
        return
    latents = reconstruct(model, inversion, progress=cfg.progress)
    recon = frames_from_tensor(model.decode_latents(latents))
    vae_only = frames_from_tensor(model.decode_latents(inversion.clean))
    t3 = time.perf_counter()
    write_video(report.output("reconstruction.mp4"), recon, video.fps)
    write_frames(report.output("frames"), recon)
    write_video(report.output("input.mp4"), video.frames, video.fps)
    for name, value in {
        "psnr_reconstruction_vs_input": psnr(recon, video.frames), "psnr_vae_only_vs_input": psnr(vae_only, video.frames),
        "psnr_reconstruction_vs_vae_only": psnr(recon, vae_only),
        "latent_relative_error": float((latents - inversion.clean).norm() / inversion.clean.norm()),
        "inversion_cache_hit": float(hit), "inversion_s": t2 - t1, "reconstruction_s": t3 - t2,
        "total_s": time.perf_counter() - t0,
    }.items():
        report.metric(name, value)
    m = report.metrics
    print(f"inverted {video.n_frames} frames at {video.height}x{video.width} in {m['total_s']:.1f}s "
          f"(cache {'hit' if hit else 'miss'}); reconstruction PSNR {m['psnr_reconstruction_vs_input']:.2f} dB "
          f"vs input, {m['psnr_reconstruction_vs_vae_only']:.2f} dB vs VAE-only → {out}")


def run_edit(cfg: DictConfig, out: Path, report: RunReport, models: ModelMemo | None = None) -> None:
    """The TokenFlow edit; writes edited.mp4, frames/, input.mp4 (on success) and metrics.json."""
    from omegaconf import OmegaConf

    from tokenflow.cli.config import negative_prompt
    from tokenflow.instantiation import build
    from tokenflow.core.pipeline import TokenFlowPipeline
    from tokenflow.evaluation.suites import build_suite
    from tokenflow.storage.mp4 import VideoWriter, write_video
    from tokenflow.storage.png import FrameWriter

    def parts() -> dict[str, Any]:
        return {"inverter": build(cfg.inverter), "editor": build(cfg.editor), "propagator": build(cfg.propagator),
                "keyframes": build(cfg.keyframes), "attention": build(cfg.attention)}

    t0 = time.perf_counter()
    ranks = Ranks.current()  # the pipeline shares the work among the processes of a torchrun launch
    suite = build_suite(OmegaConf.to_container(cfg.metrics, resolve=True))  # a bad metric setting fails before any work
    model, video, p, shape = _prepare(cfg, report, out, parts, models)
    pipe = TokenFlowPipeline(model, p["editor"], p["propagator"], p["keyframes"], p["inverter"], n_steps=cfg.n_steps,
                             chunk_size=cfg.chunk_size, cache=_open_cache(cfg, ranks), attention=p["attention"],
                             ranks=ranks)
    keep = bool(suite.metrics) and ranks.main  # the metrics read the whole edited clip; else frames stream to disk
    with ExitStack() as outputs:
        sinks = [outputs.enter_context(VideoWriter(report.output("edited.mp4"), video.fps)),
                 outputs.enter_context(FrameWriter(report.output("frames")))] if ranks.main else []
        what = f"{video.n_frames} frames at {video.height}x{video.width}"
        recheck = lambda schedule: preflight.recheck_keyframes(model, shape, schedule, p["attention"], what)  # noqa: E731
        result = pipe(video, cfg.prompt, negative_prompt(cfg, p["inverter"]), cfg.inversion_prompt,
                      progress=cfg.progress, output=sinks, keep_frames=keep, on_schedule=recheck)
    shares = {name: ranks.gather(value) for name, value in (("inversion_frames", result.timings["inversion_frames"]),
                                                            ("inversion_cache_hit", result.timings["inversion_cache_hit"]),
                                                            ("unet_evaluations", result.unet_evaluations))}
    if not ranks.main:  # outputs and metrics are rank 0's
        return
    write_video(report.output("input.mp4"), video.frames, video.fps)
    for name, value in result.timings.items():
        report.metric(name, value, INVERSION_FRAMES if name == "inversion_frames" else None)
    report.metric("unet_evaluations", result.unet_evaluations)
    if ranks.distributed:
        report.metric("world_size", ranks.world, WORLD_SIZE)
        report.info["ranks"] = {name: [int(v) for v in values] for name, values in shares.items()}
    report.info["keyframes"] = result.keyframes
    if keep:
        t1 = time.perf_counter()
        scores = suite.evaluate(result.frames, video.frames, cfg.prompt)
        for name, value in scores.values.items():
            report.metric(name, value, scores.definitions[name])
        if scores.meaningless:
            report.info["meaningless_metrics"] = scores.meaningless
        if scores.withheld:
            log.warning("metrics not reported: %s", scores.withheld)
            report.info["metrics_withheld"] = scores.withheld
        report.metric("scoring_s", time.perf_counter() - t1, "wall seconds to compute the configured metrics (cfg.metrics)")
    report.metric("total_s", time.perf_counter() - t0)
    print(f"edited {video.n_frames} frames at {video.height}x{video.width} in {report.metrics['total_s']:.1f}s "
          f"({result.unet_evaluations} {'UNet' if model.family == 'unet' else 'transformer'} evaluations) → "
          f"{out / 'edited.mp4'}")


@dataclass
class _Session:
    """One console-script invocation: its arguments, whether tracebacks were asked for, the models its jobs
    keep for each other."""

    task: str
    run: RunFunction
    args: list[str]
    verbose: bool = False
    failure: BaseException | None = None  # a single run's error, raised after Hydra returns
    failure_line: str | None = None       # its one line (None: a bug), as written to metrics.json
    models: ModelMemo = field(default_factory=ModelMemo)

    def job(self, cfg: DictConfig) -> None:
        """A Hydra job: run, and always leave config.yaml and metrics.json (status ok or failed).

        Under torchrun the job first joins the process group; only rank 0 writes (the others' ``out`` is a
        temporary folder), and rank 0 publishes only once every rank has finished its part."""
        hc = HydraConfig.get()
        out = Path(hc.runtime.output_dir)
        multirun = hc.mode == RunMode.MULTIRUN
        self.verbose = bool(cfg.get("verbose", False))
        logging.getLogger("tokenflow").setLevel(logging.INFO)
        report = RunReport(out, self.task, parse_overrides(list(hc.overrides.task)))
        report.command = [f"tokenflow-{self.task}", *self.args]
        report.info["pid"] = os.getpid()
        ranks = Ranks.from_environment()  # until the group is joined: who writes is known from the launcher
        try:
            ranks = init_from_environment()  # gloo on CPU, NCCL on GPUs; a single process without torchrun
            given = {k.lstrip("+~").split("@")[0] for k in report.overrides}
            applied = apply_item(cfg, given)  # a dataset run: its video, prompt, size (the command line wins)
            if applied:
                report.overrides = {**report.overrides, **{k: applied[k] for k in ("video", "prompt") if k in applied}}
                report.info["dataset_item"] = str(cfg.item)
            if ranks.main:
                save_config(cfg, out)
                write_manifest(out, run_manifest(cfg, command=report.command, started_at=report.started))
            self.run(cfg, out, report, self.models)
            ranks.barrier()  # every rank's part is done: a rank that failed never arrives, so nothing is published
        except Exception as e:
            line = user_error(e, self.args, _places(cfg, out))
            if line is not None and ranks.distributed and not isinstance(e, RankStopped):
                line = f"{ranks.label}: {line}"
            if not ranks.main:  # its error line (or traceback) goes to stderr; rank 0 writes the run folder
                self.failure, self.failure_line = e, line
                return None
            error = line or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (a bug: " \
                            f"{_save_traceback(e, out)})"
            try:
                report.write(error)
            except OSError as write_error:
                log.error("could not write %s: %s", out / "metrics.json", write_error)
            if multirun and not self.verbose:
                (log.error if line else log.exception)("job %s failed: %s", hc.job.num, error)
            elif not multirun:
                self.failure, self.failure_line = e, line  # raised by _main: Hydra would print its own "Error
                # executing job" first
            else:
                raise
            return None
        if ranks.main:
            report.write()
        return None


def _places(cfg: DictConfig, out: Path) -> dict[str, str]:
    """The folders a run writes to, by what they are (named in the one line of a failed write)."""
    import tempfile

    from tokenflow.paths import default_cache_dir

    cache = cfg.get("cache_dir") or default_cache_dir()
    return {str(out): "the run folder", str(cache): "the cache folder (cache_dir=)",
            tempfile.gettempdir(): "the temporary folder ($TMPDIR)"}


def _save_traceback(error: BaseException, out: Path) -> str:
    """Write ``error``'s traceback to ``out/traceback.txt``; returns where the traceback can be read."""
    import traceback

    from tokenflow.atomic import atomic_file

    try:
        with atomic_file(out / "traceback.txt") as tmp:
            tmp.write_text("".join(traceback.format_exception(error)))
    except OSError:
        return "its traceback could not be written to the run folder; rerun with verbose=true"
    return f"the traceback is in {out / 'traceback.txt'}"


def _check_launch(args: list[str], launch: Ranks) -> None:
    """Refuse what a torchrun launch cannot do: a sweep (every process would run every job)."""
    if launch.distributed and any(arg in SWEEP_FLAGS for arg in args):
        raise ConfigError(f"sweeps (-m) do not run under torchrun (WORLD_SIZE={launch.world}) — run the sweep in one "
                          "process, or launch one torchrun per job")


def _main(task: str, run: RunFunction) -> Any:
    """Parse the command line with Hydra, run the job(s); one line and exit 2 for every user error.

    Under torchrun every process runs this; a non-zero rank's Hydra folder is a temporary one, removed at the
    end, so only rank 0 leaves a run folder."""
    session = _Session(task, run, sys.argv[1:])
    make_cwd_importable()
    register_resolvers()
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    launch = Ranks.from_environment()
    scratch = None if launch.main else tempfile.mkdtemp(prefix=f"tokenflow-rank{launch.rank}-")

    def task_function(cfg: DictConfig) -> None:
        return session.job(cfg)

    try:
        session.args = register_manifest_files(session.args)  # an absolute manifest path, made relative for Hydra
        _check_launch(session.args, launch)
        hydra_args = (claimed_run_dir_args(session.args) if scratch is None  # folders named on the command line are
                      else scratch_run_dir_args(session.args, scratch))      # claimed, by rank 0 alone
        if hydra_args != sys.argv[1:]:
            sys.argv = [sys.argv[0], *hydra_args]
        register_class_options(session.args)
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach us as exceptions, not as its own printout
        hydra.main(version_base="1.3", config_path="pkg://tokenflow.conf", config_name=task)(task_function)()
        if session.failure is not None:
            raise session.failure
    except SweepFailed as failed:
        for line in failed.lines:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if e is session.failure:
            line = session.failure_line
        else:  # failed before the job ran (e.g. Hydra saving .hydra/ on a full disk)
            named, places = hydra_save_failure(e)
            line = user_error(named, session.args, places)
        if line is None or session.verbose or full_error:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        if launch.distributed:
            leave_group()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def invert_main() -> Any:
    return _main("invert", run_invert)


def edit_main() -> Any:
    return _main("edit", run_edit)
