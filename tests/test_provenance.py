"""Run manifests: the fields a run needs to be traced, checked against independent sources."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import tokenflow
from tokenflow.evaluation.provenance import (MANIFEST_NAME, git_info, library_info, package_versions, run_manifest,
                                             write_manifest)
from tokenflow.digests import video_fingerprint
from tokenflow.storage.video import Video
from conftest import translating_clip

REPO = Path(tokenflow.__file__).resolve().parents[1]
FIELDS = {"format", "library", "packages", "device", "video", "model", "seed", "config", "command", "argv", "cwd",
          "hostname", "platform", "started_at"}


def test_manifest_fields(tiny) -> None:
    video = Video(translating_clip(n=3, h=64, w=64), fps=12.0, source="clip.mp4")
    cfg = OmegaConf.create({"seed": 7, "n_steps": 4, "inverter": {"n_steps": "${n_steps}"}, "video": "clip.mp4"})
    started = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    manifest = run_manifest(cfg, model=tiny, video=video, command=["tokenflow-edit", "prompt=a fox"], started_at=started)
    assert set(manifest) == FIELDS
    assert manifest["video"] == {"source": "clip.mp4", "fingerprint": video_fingerprint(video), "n_frames": 3,
                                 "height": 64, "width": 64, "fps": 12.0}
    assert manifest["model"] == {"identity": tiny.identity, "fingerprint": tiny.fingerprint, "dtype": "float32"}
    assert manifest["config"]["inverter"]["n_steps"] == 4  # resolved
    assert manifest["seed"] == 7 and run_manifest({"seed": 3}, seed=11)["seed"] == 11
    assert manifest["command"] == "tokenflow-edit 'prompt=a fox'"
    assert manifest["started_at"] == "2025-01-02T03:04:05+00:00"
    assert manifest["device"]["model_device"] == "cpu" and manifest["device"]["cpu_count"] >= 1
    json.dumps(manifest)  # JSON-ready as it is


def test_package_versions_match_the_installed_packages() -> None:
    import cv2
    import torch

    versions = package_versions()
    assert {"torch", "diffusers", "transformers", "faiss", "numpy", "opencv", "hydra", "python"} <= set(versions)
    assert versions["torch"] == metadata.version("torch") and torch.__version__.startswith(versions["torch"].split("+")[0])
    assert versions["numpy"] == np.__version__
    assert cv2.__version__ in versions["opencv"]
    assert versions["python"] == "%d.%d.%d" % sys.version_info[:3]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_git_commit_is_this_checkout() -> None:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    info = library_info()
    assert info["git"]["commit"] == head and info["git"]["root"] == str(REPO)
    assert isinstance(info["git"]["dirty"], bool) and info["version"] == metadata.version("tokenflow-video")


def test_no_commit_outside_a_checkout(tmp_path: Path) -> None:
    assert git_info(tmp_path) is None
    if (REPO / ".git").exists() and shutil.which("git"):
        assert git_info(REPO / "tokenflow") is None  # inside a checkout but not its top level


def test_write_manifest_is_atomic_json(tmp_path: Path, failing_half_way) -> None:
    manifest = run_manifest({"seed": 1}, command=["x"])
    path = write_manifest(tmp_path / "run", manifest)
    assert path == tmp_path / "run" / MANIFEST_NAME
    assert json.loads(path.read_text()) == json.loads(json.dumps(manifest))
    assert [p.name for p in path.parent.iterdir()] == [MANIFEST_NAME]  # no temporary file left
    # a write that fails half-way (a full disk) leaves the previous manifest whole and no temporary file
    before = path.read_bytes()
    with failing_half_way():
        with pytest.raises(OSError):
            write_manifest(tmp_path / "run", run_manifest({"seed": 2}, command=["y"]))
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [MANIFEST_NAME]
