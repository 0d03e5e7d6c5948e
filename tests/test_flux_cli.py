"""FLUX.1 and FlowEdit from the command line: sweeps over every supported editor x propagator on the embedded clip
(tiny FLUX.1-dev, tiny SD 3.5), and an inversion-free run that writes no trajectory."""
from __future__ import annotations

import json

from test_cli import assert_metrics_format, run

COMMON = ["experiment=tiny_smoke", "n_frames=4", "height=64", "width=64", "n_steps=3", "keyframe_stride=2",
          "prompt=a robotic wolf", "inversion_prompt=a wolf", "progress=false", "metrics=none"]
FLUX = ["model.tiny_variant=flux-dev", "+model.max_sequence_length=16", *COMMON]
SD35 = ["model.tiny_variant=sd35-medium", "+model.max_sequence_length=32", *COMMON]


def _jobs(tmp_path):
    (sweep,) = (tmp_path / "multirun" / "edit").glob("*/*")
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())


def _check(job) -> dict:
    record = json.loads((job / "metrics.json").read_text())
    assert_metrics_format(record, "edit")
    assert record["status"] == "ok", record["error"]
    assert (job / "edited.mp4").is_file() and len(list((job / "frames").glob("*.png"))) == 4
    return record


def test_a_tiny_flux_edits_the_embedded_clip_with_each_editor_and_propagator(tmp_path, cache_dir):
    result = run("tokenflow-edit", "-m", *FLUX, "editor=sdedit,kv_injection,flowedit", "propagator=tokenflow,none",
                 cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {}
    for job in _jobs(tmp_path):
        record = _check(job)
        seen[(record["overrides"]["editor"], record["overrides"]["propagator"])] = record["metrics"]["unet_evaluations"]
    # FLUX: no CFG batch. sdedit (strength 0.9 of 3 steps: 3) 1 branch, +1 source with TokenFlow; kv_injection
    # source + cond; flowedit (n_max 33 > 3: every step) source + target velocity
    assert seen == {("sdedit", "tokenflow"): 2 * 4 * 3, ("sdedit", "none"): 4 * 3,
                    ("kv_injection", "tokenflow"): 2 * 4 * 3, ("kv_injection", "none"): 2 * 4 * 3,
                    ("flowedit", "tokenflow"): 2 * 4 * 3, ("flowedit", "none"): 2 * 4 * 3}


def test_a_tiny_sd35_edits_with_flowedit_and_writes_no_trajectory(tmp_path, cache_dir):
    cache = tmp_path / "cache"
    result = run("tokenflow-edit", "-m", *SD35, "editor=flowedit", "propagator=tokenflow,none", f"cache_dir={cache}",
                 cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(tmp_path)
    assert len(jobs) == 2
    for job in jobs:
        record = _check(job)
        # SD 3 at the published 3.5 / 13.5: CFG on both velocities, 4 evaluations per frame and step, no inversion
        assert record["metrics"]["unet_evaluations"] == 4 * 4 * 3
        assert record["metrics"]["inversion_cache_hit"] == 0.0
    inversions = cache / "inversions"
    assert not inversions.exists() or not any(p.is_file() for p in inversions.rglob("*")), list(inversions.rglob("*"))


def test_the_published_flowedit_recipes_are_presets():
    from test_configs import _compose

    sd3, flux = _compose(overrides=["experiment=flowedit_sd3"]), _compose(overrides=["experiment=flowedit_flux"])
    assert sd3.editor._target_.endswith("FlowEditEditor") and sd3.n_steps == 50
    assert (sd3.editor.n_max, sd3.editor.n_min, sd3.editor.n_avg) == (33, 0, 1)
    assert (sd3.editor.src_guidance_scale, sd3.editor.tar_guidance_scale) == (3.5, 13.5)
    assert flux.n_steps == 28 and (flux.editor.n_max, flux.editor.n_min, flux.editor.n_avg) == (24, 0, 1)
    assert (flux.editor.src_guidance_scale, flux.editor.tar_guidance_scale) == (1.5, 5.5)
