"""The sample clip shipped inside the package: the main job's default input, so nothing is downloaded.

``sample-wolf.mp4``: the first 24 frames of the official TokenFlow sample ``wolf.mp4``, downscaled from
512x512 to 256x256 (H.264, 20 fps, about 50 KB). MIT licence, (c) 2023 Michal Geyer, Omer Bar-Tal,
Shai Bagon, Tali Dekel: ``tokenflow/data/LICENSE-sample-wolf.txt``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE = "sample"  # the value of ``video=`` that names the embedded clip
SAMPLE_FILE = "sample-wolf.mp4"
SAMPLE_DESCRIPTION = "24 frames of the official TokenFlow wolf.mp4 at 256x256, MIT licence"


def sample_video_path() -> Path:
    """Path of the embedded sample clip inside the installed package."""
    path = Path(str(resources.files("tokenflow") / "data" / SAMPLE_FILE))
    if not path.is_file():  # a broken install, not a user error we can fix here
        raise FileNotFoundError(f"the embedded sample clip is missing at {path} — reinstall tokenflow-video")
    return path


def is_sample(video: str | None) -> bool:
    """Whether ``video`` names the embedded clip (``sample``, or unset)."""
    return video is None or str(video).strip() in ("", SAMPLE)
