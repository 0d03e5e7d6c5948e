"""One edit, two processes: ``tokenflow-edit`` under torchrun, and the inversion split by frame chunks.

CPU, gloo, the tiny model, the embedded sample clip at 8 frames of 64x64, 3 steps, chunks of 2 frames (so
the inversion has 4 chunks to share); every child process runs one thread. The CLI under
``python -m torch.distributed.run --standalone --nproc-per-node 2`` gives the single-process frames bit for
bit, leaves one run folder (rank 0's) and nothing of the other rank, inverts half the frames on each rank,
and hits the cache from every rank on a second run; a rank that fails ends the run non-zero with its error
line and publishes nothing. Through the Python API, 2 gloo processes give the single-process trajectory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

BIN = Path(sys.executable).parent
EDIT = ["experiment=tiny_smoke", "n_frames=8", "n_steps=3", "height=64", "width=64", "chunk_size=2",
        "keyframe_stride=4", "progress=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
FAILING_EDITOR = textwrap.dedent("""
    # an editor that fails on rank 1 only, after the inversion (the other rank is then inside the edit)
    import torch.distributed as dist

    from tokenflow.editors import PnPEditor
    from tokenflow.errors import ConfigError


    class FailsOnRank1(PnPEditor):
        def prepare(self, inputs):
            if dist.is_initialized() and dist.get_rank() == 1:
                raise ConfigError("injected failure on rank 1 — nothing to fix, a test")
            super().prepare(inputs)
""")


@pytest.fixture(scope="module")
def model_dir(cache_dir) -> Path:
    """The tiny model, built once before any child process (they load it from ``model.cache_dir``)."""
    from tokenflow.models.tiny import tiny_model_folder

    tiny_model_folder(cache_dir)
    return cache_dir


def _run(command: list[str], cwd: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command with one thread per process and its own $TMPDIR; returns (result, wall seconds)."""
    cwd.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp)}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return result, time.perf_counter() - start


def _edit(cwd: Path, cache: Path, model_dir: Path, *, launcher: list[str] = (), module: bool = False,
          extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """tokenflow-edit on the sample clip, as the console script or (under ``launcher``) ``-m tokenflow.cli edit``."""
    script = ["-m", "tokenflow.cli", "edit"] if module else [str(BIN / "tokenflow-edit")]  # module: torchrun's -m
    overrides = [*EDIT, f"cache_dir={cache}", f"model.cache_dir={model_dir}", *extra]
    return _run([*launcher, *script, *overrides], cwd, cwd / "tmp")


def _run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs").glob("*/*/*") if p.is_dir())


def _frames(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "frames").glob("*.png"))}


def test_torchrun_edit_is_the_single_process_edit_and_hits_the_cache_on_every_rank(tmp_path, model_dir):
    if not (BIN / "tokenflow-edit").exists():
        pytest.skip("tokenflow-edit is not installed in this environment (pip install -e .)")
    single, t_single = _edit(tmp_path / "single", tmp_path / "single-cache", model_dir)
    assert single.returncode == 0, single.stderr[-3000:]
    cache = tmp_path / "cache"
    first, t_two = _edit(tmp_path / "two", cache, model_dir, launcher=TORCHRUN)
    assert first.returncode == 0, first.stderr[-3000:]
    second, t_again = _edit(tmp_path / "again", cache, model_dir, launcher=TORCHRUN, module=True)
    assert second.returncode == 0, second.stderr[-3000:]
    print(f"tokenflow-edit, 8 frames at 64x64, 3 steps, tiny model: 1 process {t_single:.1f} s, 2 processes "
          f"{t_two:.1f} s (cache miss), {t_again:.1f} s (cache hit)")

    reference = _frames(_run_dirs(tmp_path / "single")[0])
    assert len(reference) == 8
    for name, result in (("two", first), ("again", second)):
        runs = _run_dirs(tmp_path / name)
        assert len(runs) == 1, runs  # rank 0's folder only
        run = runs[0]
        assert _frames(run) == reference  # the PNGs, byte for byte
        assert {"config.yaml", "manifest.json", "metrics.json", "edited.mp4", "input.mp4"} <= {p.name for p in run.iterdir()}
        record = json.loads((run / "metrics.json").read_text())
        assert record["status"] == "ok" and record["metrics"]["world_size"] == 2.0
        assert "warp_error@opencv-farneback" in record["metrics"]  # computed on rank 0
        assert not list((tmp_path / name / "tmp").glob("tokenflow-rank*"))  # rank 1's Hydra folder is gone
        shares = record["info"]["ranks"]
        if name == "two":  # the inversion was split: 4 chunks of 2 frames, 2 per rank
            assert shares["inversion_frames"] == [4, 4] and shares["inversion_cache_hit"] == [0, 0], shares
            assert (result.stdout + result.stderr).count("inversion split by frame chunks") == 2  # Hydra logs to stdout
        else:  # the second run hits the entry from every rank
            assert shares["inversion_frames"] == [0, 0] and shares["inversion_cache_hit"] == [1, 1], shares
            assert record["metrics"]["inversion_cache_hit"] == 1.0
            log = result.stdout + result.stderr
            assert "hit" in log and "(rank 0 of 2)" in log and "(rank 1 of 2)" in log
    single_record = json.loads((_run_dirs(tmp_path / "single")[0] / "metrics.json").read_text())
    assert single_record["metrics"]["inversion_frames"] == 8.0 and "world_size" not in single_record["metrics"]
    entries = sorted(p.name for p in (cache / "inversions").iterdir())
    assert len([e for e in entries if e.endswith(".safetensors")]) == 1 and set(entries) <= {
        "locks", *[e for e in entries if e.endswith(".safetensors")]}, entries  # one entry, no temporaries


def test_a_failing_rank_ends_the_run_and_nothing_is_published(tmp_path, model_dir):
    if not (BIN / "tokenflow-edit").exists():
        pytest.skip("tokenflow-edit is not installed in this environment (pip install -e .)")
    cwd = tmp_path / "run"
    cwd.mkdir()
    (cwd / "rank_faults.py").write_text(FAILING_EDITOR)
    result, wall = _edit(cwd, tmp_path / "cache", model_dir, launcher=TORCHRUN,
                         extra=("editor=rank_faults.FailsOnRank1", "metrics=none"))
    assert result.returncode != 0, result.stderr[-3000:]
    assert "error: rank 1 of 2: injected failure on rank 1" in result.stderr, result.stderr[-3000:]
    assert not list(cwd.glob("outputs/**/edited.mp4")) and not list(cwd.glob("outputs/**/frames"))
    runs = _run_dirs(cwd)
    assert len(runs) <= 1, runs  # rank 0's folder, at most (config.yaml; metrics.json if it saw the failure)
    for run in runs:
        if (run / "metrics.json").exists():
            assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    assert wall < 120  # no rank waits for the failed one


def test_sweeps_are_refused_under_torchrun(monkeypatch):
    from tokenflow.cli.main import _check_launch
    from tokenflow.core.distributed import Ranks
    from tokenflow.errors import ConfigError

    _check_launch(["-m", "n_steps=2,3"], Ranks())  # one process: a sweep is fine
    with pytest.raises(ConfigError, match="sweeps .-m. do not run under torchrun"):
        _check_launch(["-m", "n_steps=2,3"], Ranks(0, 2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert Ranks.from_environment() == Ranks(1, 2)


def test_scratch_run_dir_args_drop_the_run_folder():
    from tokenflow.cli.rundir import scratch_run_dir_args

    args = scratch_run_dir_args(["model=tiny", "hydra.run.dir=mine", "hydra.output_subdir=.h"], "/tmp/x y")
    assert args == ["model=tiny", "hydra.run.dir='/tmp/x y'", "hydra.sweep.dir='/tmp/x y'", "hydra.output_subdir=null"]


# ---- the split inversion through the Python API ---------------------------------------------------------------

def _invert_worker(rank: int, world: int, rendezvous: str, cache_dir: str, inversions: str, out: str) -> None:
    """Invert an 8-frame clip (chunks of 2) twice into one cache, in one process or as one rank of a gloo group."""
    sys.path.insert(0, str(Path(__file__).parent))
    import torch.distributed as dist

    from conftest import UNetCounter, translation_clip
    from tokenflow import DDIMInverter, invert_video, load_model
    from tokenflow.storage.cache import InversionCache

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = load_model("tiny", device="cpu", dtype="float32", cache_dir=cache_dir)
        video = translation_clip(n=8, size=64, shift=8)
        inverter = DDIMInverter(n_steps=3, keep_steps=3, batch_size=2)
        cache = InversionCache(inversions)
        with UNetCounter(model.denoiser) as counter:
            inversion, hit = invert_video(model, video, inverter, "a texture", cache, progress=False)
        again, hit_again = invert_video(model, video, inverter, "a texture", cache, progress=False)
        torch.save({"latents": inversion.latents, "again": again.latents, "hit": (hit, hit_again),
                    "unet": counter.samples}, f"{out}.{world}.{rank}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_processes_invert_the_single_process_trajectory(tmp_path, model_dir):
    out = str(tmp_path / "inversion")
    for world in (1, 2):
        mp.start_processes(_invert_worker, args=(world, str(tmp_path / f"rendezvous{world}"), str(model_dir),
                                                 str(tmp_path / f"cache{world}"), out),
                           nprocs=world, join=True, start_method="spawn")
    single = torch.load(f"{out}.1.0")
    ranks = [torch.load(f"{out}.2.{rank}") for rank in range(2)]
    for result in ranks:
        assert torch.equal(result["latents"], single["latents"])  # every slab, bit for bit
        assert torch.equal(result["again"], single["latents"])  # and the cache entry rank 0 wrote
        assert result["hit"] == (False, True)  # rank 0's miss, then its hit, on every rank
        assert result["unet"] == single["unet"] // 2  # half the frame chunks each
    assert single["hit"] == (False, True) and single["unet"] == 8 * 3
    assert len(list((tmp_path / "cache2").glob("*.safetensors"))) == 1


def test_which_inverters_split_by_frames():
    """DDIM inversion splits its frame chunks among ranks; null-text inversion (optimised per frame, its own
    loop) falls back to every rank inverting every frame."""
    from tokenflow import DDIMInverter
    from tokenflow.core.distributed import splits_frames
    from tokenflow.core.nulltext import NullTextInverter

    assert splits_frames(DDIMInverter()) and not splits_frames(NullTextInverter())
