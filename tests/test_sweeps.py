"""Sweeps end to end: the basic, joblib and submitit launchers, model and inversion reuse, the summary, datasets.

Each sweep runs ``tokenflow-edit -m`` in a subprocess on the tiny model (4 frames, 64x64, 2 steps) with a
fresh inversion cache (the tiny model's folder is shared with the session cache), so counts of loads and
cache hits come from the jobs' metrics.json alone.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
SMALL = ["model=tiny", "video=sample", "n_frames=4", "height=64", "width=64", "n_steps=2", "progress=false",
         "metrics=none", "inversion_prompt=a wolf"]
GRID = ["prompt=a fox,a cat", "keyframe_stride=2,4"]  # 2 x 2; Hydra numbers jobs prompt-major


def _cache(tmp: Path, session_cache: Path) -> Path:
    """A cache folder with no inversions whose models/ is the session's (the tiny model is built once)."""
    folder = tmp / "cache"
    folder.mkdir()
    (session_cache / "models").mkdir(parents=True, exist_ok=True)
    (folder / "models").symlink_to((session_cache / "models").resolve(), target_is_directory=True)
    return folder


def _edit(cwd: Path, *overrides: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``tokenflow-edit`` in ``cwd``; returns the completed process and its pid."""
    exe = BIN / "tokenflow-edit"
    if not exe.exists():
        pytest.skip("tokenflow-edit is not installed in this environment (pip install -e .)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), *overrides], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def _sweep_dir(cwd: Path) -> Path:
    dirs = sorted((cwd / "multirun" / "edit").glob("*/*"))
    assert len(dirs) == 1, dirs  # one sweep folder, claimed once whatever the launcher
    return dirs[0]


def _jobs(sweep: Path) -> list[dict]:
    jobs = sorted((d for d in sweep.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    return [{"dir": d, **json.loads((d / "metrics.json").read_text())} for d in jobs]


def _frames(job: dict) -> np.ndarray:
    from tokenflow.runs.outputs import read_native

    return read_native(job["dir"] / "frames").frames.astype(np.int16)


@pytest.fixture(scope="module")
def basic(tmp_path_factory, cache_dir, tiny):
    cwd = tmp_path_factory.mktemp("basic")
    cache = _cache(cwd, cache_dir)
    result, pid = _edit(cwd, "-m", *SMALL, *GRID, f"cache_dir={cache}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"sweep": _sweep_dir(cwd), "pid": pid, "log": result.stdout + result.stderr, "cache": cache}


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory, basic):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cwd = tmp_path_factory.mktemp("joblib")
    result, pid = _edit(cwd, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMALL, *GRID,
                        f"cache_dir={basic['cache']}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"sweep": _sweep_dir(cwd), "pid": pid}


def test_basic_sweep_loads_the_model_once_and_inverts_once(basic, tiny):
    jobs = _jobs(basic["sweep"])
    assert [j["status"] for j in jobs] == ["ok"] * 4
    assert [(j["overrides"]["prompt"], j["overrides"]["keyframe_stride"]) for j in jobs] == [
        ("a fox", 2), ("a fox", 4), ("a cat", 2), ("a cat", 4)]
    # one process ran every job and loaded the model once; the others got it back from the memo
    assert {j["info"]["pid"] for j in jobs} == {basic["pid"]}
    assert [j["metrics"]["model_reused"] for j in jobs] == [0.0, 1.0, 1.0, 1.0]
    assert basic["log"].count("loaded tiny:") == 1  # the loader's log line
    assert {j["info"]["model_fingerprint"] for j in jobs} == {tiny.fingerprint}  # the weights a fresh load has
    # one inversion: computed by job 0 (fresh cache), read from the cache by the three others
    assert [j["metrics"]["inversion_cache_hit"] for j in jobs] == [0.0, 1.0, 1.0, 1.0]
    assert len(list((basic["cache"] / "inversions").glob("*.safetensors"))) == 1  # one entry (and its lock file)
    # the swept values took effect: 4 frames with stride 2 → 2 keyframes per step, stride 4 → 1
    assert [{len(step) for step in j["info"]["keyframes"]} for j in jobs] == [{2}, {1}, {2}, {1}]
    fox, cat = _frames(jobs[0]), _frames(jobs[2])
    assert np.abs(fox - cat).max() > 0  # the prompt reached the editor


def test_joblib_runs_jobs_in_two_workers_each_loading_once(joblib_sweep, basic):
    jobs = _jobs(joblib_sweep["sweep"])
    assert [j["status"] for j in jobs] == ["ok"] * 4
    pids = [j["info"]["pid"] for j in jobs]
    assert len(set(pids)) == 2 and joblib_sweep["pid"] not in pids  # two loky workers, not the launching process
    for pid in set(pids):  # each worker loaded the model for its first job and reused it after
        assert sorted(j["metrics"]["model_reused"] for j in jobs if j["info"]["pid"] == pid)[0] == 0.0
    assert sum(j["metrics"]["model_reused"] == 0.0 for j in jobs) == 2
    assert all(j["metrics"]["inversion_cache_hit"] == 1.0 for j in jobs)  # the basic sweep's inversion
    # every job's output equals the basic sweep's (a model reused in one process, loaded fresh in another)
    for mine, theirs in zip(jobs, _jobs(basic["sweep"])):
        assert mine["overrides"] == theirs["overrides"]
        assert np.abs(_frames(mine) - _frames(theirs)).max() <= 1, mine["dir"]


def test_summarize_writes_table_plots_and_contact_sheet(basic):
    from tokenflow.cli.summarize import main

    assert main([str(basic["sweep"])]) == 0
    out = basic["sweep"] / "summary"
    rows = list(csv.DictReader((out / "summary.csv").open()))
    jobs = _jobs(basic["sweep"])
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    for row, job in zip(rows, jobs):  # the table is the jobs' metrics.json
        assert row["prompt"] == job["overrides"]["prompt"]
        assert int(row["keyframe_stride"]) == job["overrides"]["keyframe_stride"]
        assert float(row["model_reused"]) == job["metrics"]["model_reused"]
        assert float(row["unet_evaluations"]) == job["metrics"]["unet_evaluations"]
    md = (out / "summary.md").read_text()
    assert "swept: `prompt`, `keyframe_stride`" in md and md.count("| ok |") == 4
    plots = {p.name for p in (out / "plots").glob("*.png")}
    metrics = list(jobs[0]["metrics"])
    assert plots == {f"{m}__vs__{p}.png" for m in metrics for p in ("prompt", "keyframe_stride")}
    from PIL import Image

    sheet = np.asarray(Image.open(out / "contact_sample.png"))
    assert sheet.shape[1] == 5 * 128  # the input and the four jobs side by side


def test_submitit_local_runs_a_job_in_its_own_process(tmp_path, basic):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result, pid = _edit(tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *SMALL,
                        "prompt=a cat", "keyframe_stride=4", f"cache_dir={basic['cache']}")
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = _jobs(_sweep_dir(tmp_path))
    assert job["status"] == "ok" and job["info"]["pid"] != pid  # submitit ran it in a process of its own
    assert job["metrics"]["model_reused"] == 0.0 and job["metrics"]["inversion_cache_hit"] == 1.0
    assert np.abs(_frames(job) - _frames(_jobs(basic["sweep"])[3])).max() <= 1  # the same job as the basic sweep's #3


def test_dataset_sweep_runs_every_item_and_groups_by_video(tmp_path, basic):
    from conftest import translating_clip

    from tokenflow.evaluation.sweep import load_sweep
    from tokenflow.evaluation.tables import markdown
    from tokenflow.storage.mp4 import write_video

    for name, seed in (("left", 0), ("right", 1)):
        write_video(tmp_path / "clips" / f"{name}.mp4", translating_clip(n=6, h=64, w=64, seed=seed), 10.0)
    manifest = tmp_path / "videos.yaml"
    manifest.write_text("root: clips\nitems:\n"
                        "  - {video: left.mp4, prompts: [a fox], inversion_prompt: a texture, size: [64, 64],"
                        " frames: 4}\n"
                        "  - {video: right.mp4, prompts: [a cat], size: 64, frames: 2}\n")
    small = [s for s in SMALL if not s.startswith(("video=", "n_frames=", "height=", "width=", "inversion_prompt="))]
    result, _ = _edit(tmp_path, "-m", f"dataset={manifest}", *small, f"cache_dir={basic['cache']}")  # absolute path
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(_sweep_dir(tmp_path))
    assert [j["status"] for j in jobs] == ["ok", "ok"]
    assert [j["overrides"]["item"] for j in jobs] == ["left/0", "right/0"]
    assert [j["overrides"]["prompt"] for j in jobs] == ["a fox", "a cat"]
    assert [j["info"]["n_frames"] for j in jobs] == [4, 2]
    assert [Path(j["info"]["video"]).name for j in jobs] == ["left.mp4", "right.mp4"]
    from tokenflow.runs.outputs import read_native
    from tokenflow.storage.video import read_video

    for job, name in zip(jobs, ("left", "right")):  # each job edited its own clip
        expected = read_video(tmp_path / "clips" / f"{name}.mp4", n_frames=job["info"]["n_frames"], height=64, width=64)
        assert np.array_equal(read_native(job["dir"] / "input.mp4").frames.shape, expected.frames.shape)
        assert np.abs(read_native(job["dir"] / "input.mp4").frames.astype(int) - expected.frames).mean() < 3
    assert jobs[0]["metrics"]["model_reused"] == 0.0 and jobs[1]["metrics"]["model_reused"] == 1.0
    sweep = load_sweep(_sweep_dir(tmp_path))
    assert {g: [j.name for j in js] for g, js in sweep.groups().items()} == {"left": ["0"], "right": ["1"]}
    assert "## By input" in markdown(sweep)


# --- the model memo, in process ------------------------------------------------------------------


def small_model(tag: str = "a"):
    """A model "load" for the memo tests (fast): a small random UNet with cross-attention; ``tag`` names it."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2)
    unet = unet.eval().requires_grad_(False)
    return SimpleNamespace(unet=unet, denoiser=unet, components=lambda: {"unet": unet}, fingerprint=tag,
                           device="cpu", dtype="float32", identity=tag)


@pytest.fixture
def node():
    return lambda tag="a": {"_target_": f"{__name__}.small_model", "tag": tag}


def test_model_memo_reuses_and_reloads_a_changed_model(node):
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from tokenflow.cli.config import ModelMemo

    memo = ModelMemo(capacity=1)
    first, reused = memo.get(node())
    assert not reused and first.fingerprint == "a"
    again, reused = memo.get(node())
    assert reused and again is first and (memo.loads, memo.reuses) == (1, 1)
    with torch.no_grad():  # a job that wrote into a weight: the kept model no longer is the config's model
        first.unet.conv_in.weight[0, 0, 0, 0] += 1.0
    fresh, reused = memo.get(node())
    assert not reused and fresh is not first
    fresh.unet.set_attn_processor(AttnProcessor())  # a job that left other attention processors installed
    assert memo.get(node())[1] is False
    handle = memo.get(node())[0].unet.register_forward_hook(lambda *a: None)  # or a forward hook
    assert memo.get(node())[1] is False
    handle.remove()
    kept = memo.get(node())[0]
    kept.unet.conv_in.weight = torch.nn.Parameter(kept.unet.conv_in.weight.clone())  # or a replaced weight
    assert memo.get(node())[1] is False


def test_model_memo_is_bounded_and_stays_in_its_process(node):
    import pickle

    from tokenflow.cli.config import WORKER_MODELS, ModelMemo

    memo = ModelMemo(capacity=1)
    memo.get(node("a"))
    memo.get(node("b"))  # another model config: the first is evicted (capacity 1)
    assert len(memo) == 1 and memo.get(node("a"))[1] is False
    assert memo.get(node("a"), capacity=0)[1] is True and len(memo) == 0  # model_memo=0 keeps nothing
    two = ModelMemo(capacity=2)
    two.get(node("a")), two.get(node("b"))
    assert two.get(node("a"))[1] and two.get(node("b"))[1] and len(two) == 2
    copy = pickle.loads(pickle.dumps(two))  # what a joblib/submitit worker receives with the task function
    assert copy is WORKER_MODELS and len(copy) == 0 and copy.capacity == 2  # models never cross processes
    two.clear()
    assert len(two) == 0
