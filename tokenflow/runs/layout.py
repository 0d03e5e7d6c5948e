"""The file names of a run folder and which folders are runs (or a multirun's jobs)."""
from __future__ import annotations

from pathlib import Path

from tokenflow.errors import VideoError

CONFIG = "config.yaml"                     # the resolved run config
MANIFEST = "manifest.json"                 # provenance (tokenflow.evaluation.provenance)
METRICS = "metrics.json"                   # the run record (tokenflow.runs.record)
HYDRA_OVERRIDES = ".hydra/overrides.yaml"  # the job's command-line overrides, as Hydra writes them
HYDRA_CONFIG = ".hydra/config.yaml"        # Hydra's composed config (a job killed before writing config.yaml)
INPUT = "input.mp4"                        # the source frames, at the run's size
EDITED = "edited.mp4"                      # an edit's output
RECONSTRUCTION = "reconstruction.mp4"      # an inversion's output
FRAMES = "frames"                          # the output as lossless PNGs


def is_run_dir(path: str | Path) -> bool:
    """A single run's folder (it has metrics.json, config.yaml or .hydra/overrides.yaml)."""
    p = Path(path)
    return any((p / name).is_file() for name in (METRICS, CONFIG, HYDRA_OVERRIDES))


def job_order(job: Path) -> tuple[int, int, str]:
    """Sort key of a multirun's job folders: numbered jobs by number, then the others by name."""
    return (0, int(job.name), "") if job.name.isdigit() else (1, 0, job.name)


def job_dirs(multirun: str | Path) -> list[Path]:
    """The job folders of a multirun directory, in job-number order."""
    root = Path(multirun)
    if not root.is_dir():
        raise VideoError(f"'{root}' is not a directory — point at a Hydra multirun directory")
    return sorted((d for d in root.iterdir() if d.is_dir() and is_run_dir(d)), key=job_order)
