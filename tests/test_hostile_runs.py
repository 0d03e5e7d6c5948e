"""Runs that must not publish garbage or mix: non-finite latents, degenerate frames, explicit run folders,
a full run folder, a bug's traceback, an address-space cap.

Each case is the command line a user would type (in-process where exit codes and stderr suffice, as a
subprocess where two runs race or a resource limit applies) on the tiny model, 2 frames at 64x64, 2 steps.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_robustness import SAME_SECOND, TINY, _finish, assert_one_line, cli


# ---- non-finite latents, degenerate frames ------------------------------------------------------------
def test_a_diverging_edit_stops_at_its_step_and_publishes_nothing(tmp_path, cache_dir, capfd, monkeypatch):
    """guidance 1e30 is finite, so it passes the settings check; the latents then overflow at the first step."""
    code, out, err = cli([*TINY, "prompt=a fox", "editor.guidance_scale=1e30", "hydra.run.dir=run"], tmp_path,
                         cache_dir, capfd, monkeypatch)
    line = assert_one_line(code, err, "the edit produced non-finite latents")
    assert re.search(r"at step [12] of 2 \(t=\d+\)", line) and "lower editor.guidance_scale" in line
    run = tmp_path / "run"
    assert not (run / "edited.mp4").exists() and not (run / "frames").exists() and not (run / "input.mp4").exists()
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "failed" and "non-finite latents" in record["error"]


def test_an_inversion_that_turns_non_finite_names_its_step(tiny):
    """A UNet that outputs NaN from its second call on: the inversion stops there, naming the stage and step."""
    from tokenflow import DDIMInverter, invert_video
    from tokenflow.errors import NonFiniteError
    from conftest import translation_clip

    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) >= 2:
            output.sample.fill_(float("nan"))
        return output

    handle = tiny.unet.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError, match=r"the DDIM inversion produced non-finite latents .* at step 2 of 3"):
            invert_video(tiny, translation_clip(n=2, size=64), DDIMInverter(n_steps=3, keep_steps=3), "a wolf",
                         progress=False)
    finally:
        handle.remove()


def test_guidance_weights_must_be_finite_in_the_python_api():
    from tokenflow.editors import PnPEditor, PromptToPromptEditor
    from tokenflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"editor.guidance_scale=nan is not a finite number"):
        PnPEditor(guidance_scale=float("nan")).guidance_scale
    with pytest.raises(ConfigError, match=r"editor.guidance_scale=inf is not a finite number"):
        PromptToPromptEditor(guidance_scale=float("inf"))


def test_flat_frames_are_not_scored_as_perfect():
    """All-black frames (what a NaN edit decodes to) would get warp error 0: no metric is reported for them."""
    from tokenflow.evaluation.suites import build_suite
    from conftest import translating_clip

    source = translating_clip(n=4, h=64, w=64)
    suite = build_suite("default")
    black = suite.evaluate(np.zeros_like(source), source)
    assert black.values == {} and "flat colour" in black.withheld
    record = black.merge_into({"metrics": {}, "definitions": {}, "info": {}})
    assert record["info"]["metrics_withheld"] == black.withheld and record["metrics"] == {}
    real = suite.evaluate(source, source)
    assert real.withheld is None and real.values["warp_error@opencv-farneback"] >= 0


# ---- a run folder named on the command line holds one run --------------------------------------------
def test_a_finished_run_folder_is_never_written_again(tmp_path, cache_dir, capfd, monkeypatch):
    code, out, err = cli([*TINY, "prompt=a fox", "hydra.run.dir=run"], tmp_path, cache_dir, capfd, monkeypatch)
    assert code == 0, err[-3000:]
    run = tmp_path / "run"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = cli([*TINY, "prompt=a cat", "hydra.run.dir=run"], tmp_path, cache_dir, capfd, monkeypatch)
    assert_one_line(code, err, "hydra.run.dir=run already holds a run")
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # not one byte of the second run (Hydra's .hydra/ and log included)


def test_a_folder_of_yours_is_not_taken(tmp_path, cache_dir, capfd, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, out, err = cli([*TINY, "prompt=a fox", f"hydra.run.dir={mine}"], tmp_path, cache_dir, capfd, monkeypatch)
    assert_one_line(code, err, "is not empty (it holds notes.txt)")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli([*TINY, "prompt=a fox", f"hydra.run.dir={empty}"], tmp_path, cache_dir, capfd, monkeypatch)
    assert code == 0 and (empty / "edited.mp4").is_file(), err[-3000:]  # an empty folder is claimed like a new one


@pytest.mark.slow
def test_two_runs_given_one_folder_at_once(tmp_path, cache_dir):
    """Started in the same second into one hydra.run.dir: one run owns it whole, the other is refused untouched."""
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    at = float(int(time.time()) + 8) + 0.05
    procs = [subprocess.Popen([sys.executable, "-c", SAME_SECOND, str(at), *TINY, f"prompt={prompt}",
                               "hydra.run.dir=shared"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for prompt in ("a fox", "a cat")]
    results = [_finish(p) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [r[1][-2000:] for r in results]
    loser = results[[p.returncode for p in procs].index(2)][1]
    assert "already holds a run" in loser and len([l for l in loser.splitlines() if l.strip()]) == 1, loser
    run = tmp_path / "shared"
    record = json.loads((run / "metrics.json").read_text())
    prompt = record["overrides"]["prompt"]
    assert f"prompt: {prompt}" in (run / "config.yaml").read_text()
    assert f"prompt={prompt}" in (run / ".hydra" / "overrides.yaml").read_text().replace("- ", "")
    assert prompt in json.loads((run / "manifest.json").read_text())["command"]


# ---- faults --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["16k", "48k"])  # full at config.yaml (Hydra's log fails first), at frames/
def test_a_full_run_folder_is_one_line_naming_it(size, small_disk, tmp_path, cache_dir, capfd, monkeypatch):
    """A run folder on a disk that fills while the run writes: one line that names the file and says it is in the
    run folder, not ~120 lines of logging tracebacks; nothing published."""
    disk = small_disk(size)
    code, out, err = cli([*TINY, "prompt=a fox", f"hydra.run.dir={disk}/run", "metrics=none"], tmp_path, cache_dir,
                         capfd, monkeypatch)
    line = assert_one_line(code, err, "No space left on device")
    assert f"in the run folder {disk}/run" in line, line
    assert "Logging error" not in out + err
    assert not (disk / "run" / "edited.mp4").exists()


def test_a_bug_says_where_its_traceback_is(tmp_path, cache_dir, capfd, monkeypatch):
    """An exception that is not a user error (a bug, here in an editor of the user's): metrics.json names a
    traceback file that exists and holds the traceback."""
    (tmp_path / "buggy_editor.py").write_text(textwrap.dedent("""
        from tokenflow.editors import PnPEditor

        class BuggyEditor(PnPEditor):
            def prepare(self, inputs):
                raise RuntimeError("index confusion in my editor")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = cli(["-m", *TINY, "prompt=a fox", "editor=buggy_editor.BuggyEditor"], tmp_path, cache_dir,
                         capfd, monkeypatch)
    assert code == 2
    (record_path,) = tmp_path.rglob("metrics.json")
    error = json.loads(record_path.read_text())["error"]
    assert error.startswith("RuntimeError: index confusion in my editor (a bug: the traceback is in ")
    path = Path(error.split("the traceback is in ", 1)[1].rstrip(")"))
    assert path == record_path.parent / "traceback.txt" and "in prepare" in path.read_text()


ADDRESS_CAP = textwrap.dedent("""
    # tokenflow-edit under an address-space cap (ulimit -v) a little above what the process maps at start-up
    import resource, sys
    import psutil
    import torch, diffusers, transformers, cv2  # mapped before the cap: the cap is for the run's own memory
    from tokenflow.cli.main import edit_main
    vms = psutil.Process().memory_info().vms
    cap = vms + int(sys.argv.pop(1))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.argv[0] = "tokenflow-edit"
    edit_main()
""")


def test_an_address_space_cap_below_the_estimate_is_one_line(tiny, tmp_path, cache_dir):
    # ``tiny``: the tiny model is built in cache_dir before the capped process loads it
    # one malloc arena: glibc reserves 64 MiB of address space per thread arena, which would eat the cap at random
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "1"}
    # at 1024x1024 the run adds about 1.0 GiB (the preflight estimate); 900 MiB of address space are left for it
    args = [*[a for a in TINY if not a.startswith(("height", "width"))], "height=1024", "width=1024", "prompt=a fox"]
    proc = subprocess.run([sys.executable, "-c", ADDRESS_CAP, str(900 << 20), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "needs about" in lines[0] and "GiB is free" in lines[0], lines[0]
    assert not list(tmp_path.rglob("*.mp4"))


def test_a_read_only_cache_folder_is_one_line_naming_it(small_disk, tmp_path, capfd, monkeypatch):
    """cache_dir on a read-only disk, where the tiny model must be built: the cause, not Hydra's wrapper line."""
    disk = small_disk("64k")
    done = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot remount read-only: {done.stderr.strip()}")
    code, out, err = cli([*TINY, "prompt=a fox", f"cache_dir={disk}/cache"], tmp_path, disk, capfd, monkeypatch)
    line = assert_one_line(code, err, "Read-only file system")
    assert f"{disk}/cache" in line and "choose a folder you can write" in line and "Error in call" not in line


def test_a_sweep_folder_named_twice_is_refused(tmp_path, cache_dir, capfd, monkeypatch):
    code, out, err = cli(["-m", *TINY, "prompt=a fox", "hydra.sweep.dir=sweep"], tmp_path, cache_dir, capfd,
                         monkeypatch)
    assert code == 0, err[-3000:]
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "sweep").rglob("*"))
    code, out, err = cli(["-m", *TINY, "prompt=a cat", "hydra.sweep.dir=sweep"], tmp_path, cache_dir, capfd,
                         monkeypatch)
    assert_one_line(code, err, "hydra.sweep.dir=sweep already holds a run")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "sweep").rglob("*")) == before


def test_an_allocation_that_fails_inside_a_wrapper_is_one_line():
    """Out of memory while Hydra instantiates the model (a cap too low even to load it): the cause, in one line."""
    from hydra.errors import InstantiationException

    from tokenflow.cli.messages import user_error

    try:
        try:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 104857600 bytes")
        except RuntimeError as e:
            raise InstantiationException("Error in call to target 'tokenflow.models.loading.load_model':\n"
                                         f"{e!r}") from e
    except InstantiationException as wrapped:
        line = user_error(wrapped)
    assert line.startswith("the run ran out of memory (") and "can't allocate memory" in line and " — " in line


def test_hydra_saving_its_files_on_a_full_disk_is_named(small_disk):
    """Hydra writes .hydra/*.yaml before the job runs, and its OSError names no file: the message still names the
    file and the run folder (which of config.yaml and .hydra/ fills the disk first depends on the log's length)."""
    from hydra.core.utils import _save_config
    from omegaconf import OmegaConf

    from tokenflow.cli.messages import hydra_save_failure, user_error

    disk = small_disk("16k")
    (disk / "fill").write_bytes(b"x" * 12 * 1024)
    with pytest.raises(OSError) as raised:
        _save_config(OmegaConf.create({"text": "y" * 8192}), "config.yaml", disk / "run" / ".hydra")
    assert not raised.value.filename  # what Hydra raises
    named, places = hydra_save_failure(raised.value)
    line = user_error(named, [], places)
    assert f"'{disk}/run/.hydra/config.yaml' in the run folder {disk}/run" in line, line
    other = ValueError("x")
    assert hydra_save_failure(other) == (other, {})  # anything else passes through
