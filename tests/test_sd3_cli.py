"""SD 3.5 from the command line: a sweep over every supported editor x propagator on the embedded clip."""
from __future__ import annotations

import json

from test_cli import assert_metrics_format, run

SD35 = ["experiment=tiny_smoke", "model.tiny_variant=sd35-medium", "+model.max_sequence_length=32", "n_frames=4",
        "height=64", "width=64", "n_steps=3", "keyframe_stride=2", "prompt=a robotic wolf", "inversion_prompt=a wolf",
        "progress=false", "metrics=none"]  # scoring is tested on the SD path; here the backbone runs end to end


def test_a_tiny_sd35_edits_the_embedded_clip_with_each_editor_and_propagator(tmp_path, cache_dir):
    result = run("tokenflow-edit", "-m", *SD35, "editor=sdedit,kv_injection", "propagator=tokenflow,flow,none",
                 cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "edit").glob("*/*")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 6
    seen = set()
    for job in jobs:
        record = json.loads((job / "metrics.json").read_text())
        assert_metrics_format(record, "edit")
        assert record["status"] == "ok", record["error"]
        assert (job / "edited.mp4").is_file() and len(list((job / "frames").glob("*.png"))) == 4
        seen.add((record["overrides"]["editor"], record["overrides"]["propagator"]))
    assert seen == {(e, p) for e in ("sdedit", "kv_injection") for p in ("tokenflow", "flow", "none")}


def test_an_editor_that_drives_unet_blocks_is_refused_in_one_line(tmp_path, cache_dir):
    result = run("tokenflow-edit", *SD35, "editor=pnp", cwd=tmp_path, cache=cache_dir)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "PnPEditor drives an SD UNet" in errors[0] and "editor=kv_injection" in errors[0], \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_scored_sd35_run_reports_the_video_metrics(tmp_path, cache_dir):
    args = [a for a in SD35 if a != "metrics=none"]  # tiny_smoke's metrics: warp error and point tracking
    result = run("tokenflow-edit", *args, "editor=kv_injection", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = (tmp_path / "outputs" / "edit").glob("*/*")
    record = json.loads((job / "metrics.json").read_text())
    assert record["status"] == "ok" and "transformer evaluations" in result.stdout
    assert {"warp_error@opencv-farneback", "track_epe@opencv-lk"} <= set(record["metrics"])
    assert record["metrics"]["unet_evaluations"] == 3 * 4 * 3  # source, uncond, cond x 4 frames x 3 steps
