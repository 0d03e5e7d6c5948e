"""Processes that share an inversion cache invert a video once: the entry's flock (``InversionCache.lock``).

Two real processes miss the same entry at once: one computes, the other waits for it and hits; a holder that is
SIGKILLed blocks no one (the kernel drops its flock); an inversion that raises releases the lock. Tiny model,
2 frames at 64x64, 2 DDIM steps; child processes use one thread.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import translation_clip

pytestmark = [pytest.mark.usefixtures("one_thread"),  # see tests/conftest.py
              pytest.mark.skipif(sys.platform == "win32", reason="flock needs fcntl (Windows runs unlocked)")]
DEADLINE = 60  # seconds any wait of these tests may take before it is called a hang
WAITING = "waiting for another process inverting the same video"

# Inverts a random 2-frame clip into a shared cache and saves (hit, timesteps, trajectory, clean latents).
# "first" stops inside invert_into (so under the lock) until the test lets it go; "second" starts only then.
INVERT = """import logging, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from tokenflow import DDIMInverter, load_model, invert_video
from tokenflow.storage.cache import InversionCache
from tokenflow.storage.video import Video

model_dir, folder, out, role, sync = sys.argv[1:6]
sync = Path(sync)
logging.basicConfig(filename=out + ".log", level=logging.INFO, format="%(name)s %(message)s")

def wait_for(name):
    deadline = time.monotonic() + 60
    while not (sync / name).exists():
        if time.monotonic() > deadline:
            sys.exit(f"{role}: no {name} after 60 s")
        time.sleep(0.05)

model = load_model("tiny", device="cpu", dtype="float32", cache_dir=model_dir)
g = torch.Generator().manual_seed(0)
video = Video.from_tensor(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, fps=10.0, source="random")
inverter = DDIMInverter(n_steps=2, keep_steps=2)
if role == "first":
    invert_into = inverter.invert_into

    def held(*args, **kwargs):
        (sync / "computing").touch()
        wait_for("go")
        return invert_into(*args, **kwargs)

    inverter.invert_into = held
else:
    wait_for("computing")
result, hit = invert_video(model, video, inverter, "a wolf", InversionCache(folder), progress=False)
torch.save({"hit": hit, "timesteps": list(result.timesteps), "clean": result.clean,
            "latents": [result.at(t) for t in result.timesteps]}, out)
"""

# Takes the entry's lock, says so, and sleeps until it is killed.
HOLD = """import sys, time
from tokenflow.storage.cache import InversionCache
with InversionCache(sys.argv[1]).lock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _inverter():
    from tokenflow import DDIMInverter

    return DDIMInverter(n_steps=2, keep_steps=2)


def _key(tiny, video) -> str:
    from tokenflow.storage.cache import cache_key
    from tokenflow.digests import video_fingerprint

    return cache_key(video=video_fingerprint(video), model=tiny.fingerprint, inverter=_inverter().settings(),
                     prompt="a wolf")


def _invert(tiny, video, cache, inverter=None):
    from tokenflow import invert_video

    return invert_video(tiny, video, inverter or _inverter(), "a wolf", cache, progress=False)


def _until(condition, what: str, procs=()) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        for p in procs:
            assert p.poll() is None, f"a child exited ({p.returncode}) before {what}: {p.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} after {DEADLINE} s"
        time.sleep(0.05)


def test_two_processes_missing_the_same_entry_invert_it_once(cache_dir, tmp_path):
    """The first holds the lock while computing; the second, started meanwhile, logs that it waits, then hits."""
    folder, sync = tmp_path / "inversions", tmp_path / "sync"
    sync.mkdir()
    outs = {role: tmp_path / f"{role}.pt" for role in ("first", "second")}
    procs = {role: subprocess.Popen([sys.executable, "-c", INVERT, str(cache_dir), str(folder), str(out), role,
                                     str(sync)], stderr=subprocess.PIPE, text=True)
             for role, out in outs.items()}
    log = Path(f"{outs['second']}.log")
    try:
        _until(lambda: log.is_file() and WAITING in log.read_text(), "wait logged by the second process",
               procs.values())
        assert len(list((folder / "locks").iterdir())) == 1  # the first holds it: its lock file is there
        (sync / "go").touch()
        for role, p in procs.items():
            _, err = p.communicate(timeout=DEADLINE)
            assert p.returncode == 0, f"{role}: {err}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    first, second = (torch.load(outs[role]) for role in ("first", "second"))
    assert (first["hit"], second["hit"]) == (False, True)  # exactly one inverted
    assert "computed by another process meanwhile" in log.read_text()
    assert first["timesteps"] == second["timesteps"] and len(first["latents"]) == 2
    assert torch.equal(first["clean"], second["clean"])
    assert all(torch.equal(a, b) for a, b in zip(first["latents"], second["latents"]))
    assert [p.name for p in (folder / "locks").iterdir()] == [f"{p.stem}.lock" for p in folder.glob("*.safetensors")]


def test_a_killed_lock_holder_blocks_no_one(tiny, tmp_path):
    """SIGKILL skips every finally: the kernel releases the flock, and the next run locks at once and computes."""
    from tokenflow.storage.cache import InversionCache

    video, cache = translation_clip(n=2, size=64), InversionCache(tmp_path / "inversions")
    key = _key(tiny, video)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache.directory), key], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        assert cache.lock_path(key).read_text().strip() == str(holder.pid)  # the holder's pid, for humans
        with pytest.raises(TimeoutError, match="another process still holds the inversion cache lock"):
            with cache.lock(key, timeout=0.3):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=DEADLINE)
        holder.stdout.close()
        holder.stderr.close()
    assert holder.returncode == -signal.SIGKILL
    start = time.monotonic()
    with cache.lock(key, timeout=5):
        pass
    assert time.monotonic() - start < 1
    result, hit = _invert(tiny, video, cache)
    assert not hit and cache.path(key).is_file()
    assert _invert(tiny, video, cache)[1]


def test_an_inversion_that_raises_releases_the_lock(tiny, tmp_path):
    """A failed inversion leaves no entry and no held lock; a later hit does not lock at all (fast path)."""
    from tokenflow.storage.cache import InversionCache

    class Broken(type(_inverter())):
        def invert_into(self, *args, **kwargs):
            raise RuntimeError("inversion failed")

    video, cache = translation_clip(n=2, size=64), InversionCache(tmp_path / "inversions")
    key = _key(tiny, video)
    with pytest.raises(RuntimeError, match="inversion failed"):
        _invert(tiny, video, cache, Broken(n_steps=2, keep_steps=2))
    assert sorted(p.name for p in cache.directory.iterdir()) == ["locks"]  # the entry's temporary was discarded
    with cache.lock(key, timeout=0):  # free at once (another descriptor's flock conflicts in one process too)
        pass
    assert not _invert(tiny, video, cache)[1]
    done: list[bool] = []
    with cache.lock(key, timeout=0):  # held: a hit must not wait for it
        reader = threading.Thread(target=lambda: done.append(_invert(tiny, video, cache)[1]), daemon=True)
        reader.start()
        reader.join(timeout=DEADLINE)
    assert done == [True]
    assert os.path.getsize(cache.lock_path(key)) == 0  # released locks hold no pid
