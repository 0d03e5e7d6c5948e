"""Storage faults that must not lose a run or hand it wrong data: forged cache entries, a FIFO in a cache
entry's place, a cache disk that is or becomes full, a full temporary folder.

Full disks are real ones (a small tmpfs, :func:`conftest.small_disk`; skipped where mounting is not
permitted). The inversions are the tiny model's, 4 frames, 2-4 DDIM steps.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import translation_clip

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
CACHE_WARNING = "cannot write the inversion cache"
DEADLINE = 20  # seconds a read of a FIFO may take before the test calls it a hang


def _invert(tiny, video, cache=None, steps: int = 2, **kwargs):
    from tokenflow import DDIMInverter, invert_video

    return invert_video(tiny, video, DDIMInverter(n_steps=steps, keep_steps=steps), "a wolf", cache, progress=False,
                        **kwargs)


def _key(tiny, video, steps: int = 2) -> str:
    from tokenflow import DDIMInverter
    from tokenflow.storage.cache import cache_key
    from tokenflow.digests import video_fingerprint

    inverter = DDIMInverter(n_steps=steps, keep_steps=steps)
    return cache_key(video=video_fingerprint(video), model=tiny.fingerprint, inverter=inverter.settings(),
                     prompt="a wolf")


@pytest.mark.parametrize("forgery", ["timesteps-swapped", "prompt", "settings", "frames", "size"])
def test_a_forged_cache_entry_is_recomputed(forgery, tiny, tmp_path, caplog):
    """An entry whose checksum verifies but whose content is not this inversion's: a miss, deleted, recomputed."""
    from tokenflow.models.trajectory import InversionResult
    from tokenflow.storage.cache import InversionCache

    video = translation_clip(n=2, size=64)
    cache = InversionCache(tmp_path / "inversions")
    truth, hit = _invert(tiny, video, cache)
    assert not hit and _invert(tiny, video, cache)[1]  # the honest entry hits
    latents = truth.latents
    if forgery == "timesteps-swapped":
        forged = InversionResult(truth.timesteps[::-1], latents, truth.clean, truth.prompt, truth.settings)
    elif forgery == "prompt":
        forged = InversionResult(truth.timesteps, latents, truth.clean, "a cat", truth.settings)
    elif forgery == "settings":
        forged = InversionResult(truth.timesteps, latents, truth.clean, truth.prompt, {**truth.settings, "eta": 0.5})
    elif forgery == "frames":  # a third frame: the latents of another clip
        forged = InversionResult(truth.timesteps, torch.cat([latents, latents[:, :1]], 1),
                                 torch.cat([truth.clean, truth.clean[:1]]), truth.prompt, truth.settings)
    else:  # half the latent size: the latents of a smaller clip
        forged = InversionResult(truth.timesteps, latents[..., ::2, ::2].contiguous(),
                                 truth.clean[..., ::2, ::2].contiguous(), truth.prompt, truth.settings)
    assert cache.save(_key(tiny, video), forged) is not None  # checksum recomputed: the file verifies
    with caplog.at_level(logging.WARNING):
        again, hit = _invert(tiny, video, cache)
    assert not hit and "does not match this inversion" in caplog.text
    assert again.timesteps == truth.timesteps and torch.equal(again.latents, latents)
    assert _invert(tiny, video, cache)[1]  # the recomputed entry replaced the forged one


# Opens the FIFO's writer end after the deadline (again and again), so that a reader blocked in open() gets EOF.
# A process, not a thread: a blocked open() may hold the GIL (safetensors' load_file does).
WATCHDOG = """import os, sys, time
fifo, deadline = sys.argv[1], float(sys.argv[2])
time.sleep(deadline)
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass
    time.sleep(0.05)
"""


def _within_deadline(fifo: Path, call: Callable[[], object]) -> dict:
    """{"out": what ``call()`` returned} or {"error": what it raised}; a call that was still blocked on ``fifo`` at
    the deadline (then released by a watchdog process) fails the test instead of hanging the suite."""
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(fifo), str(DEADLINE)])
    start, done = time.monotonic(), {}
    try:
        done["out"] = call()
    except Exception as e:  # noqa: BLE001 — handed to the test
        done["error"] = e
    finally:
        watchdog.kill()
        watchdog.wait()
    if time.monotonic() - start >= DEADLINE:
        pytest.fail(f"reading {fifo.name} blocked for {DEADLINE} s: a FIFO was opened like a file")
    return done


def test_a_fifo_in_place_of_a_cache_entry_does_not_hang(tiny, tmp_path, caplog):
    """The entry is unreadable (warned), the inversion recomputed, and the FIFO replaced by a real entry."""
    from tokenflow.storage.cache import InversionCache

    video = translation_clip(n=2, size=64)
    truth, _ = _invert(tiny, video)
    cache = InversionCache(tmp_path / "inversions")
    cache.directory.mkdir()
    fifo = cache.path(_key(tiny, video))
    os.mkfifo(fifo)
    with caplog.at_level(logging.WARNING):
        loaded = _within_deadline(fifo, lambda: cache.load(_key(tiny, video)))
        assert loaded == {"out": None} and "cannot be read" in caplog.text and fifo.name in caplog.text
        run = _within_deadline(fifo, lambda: _invert(tiny, video, cache))
    result, hit = run["out"]
    assert not hit and torch.equal(result.latents, truth.latents)
    assert fifo.is_file() and _invert(tiny, video, cache)[1]  # the new entry took the FIFO's place


def test_a_fifo_in_a_correspondence_record_does_not_hang(tmp_path):
    """A record whose timestep file is a FIFO: the lookup fails at once with an error naming the file."""
    from tokenflow.core.correspondence_cache import CorrespondenceRecord

    folder = tmp_path / "record"
    folder.mkdir()
    (folder / "complete.json").write_text("{}")
    os.mkfifo(folder / "t981.safetensors")
    record = CorrespondenceRecord(folder)
    assert record.complete
    done = _within_deadline(folder / "t981.safetensors",
                            lambda: record.lookup(981, "layer", torch.tensor([1]), torch.tensor([0])))
    assert isinstance(done.get("error"), OSError) and "t981.safetensors is not a regular file" in str(done["error"]), done


def test_open_regular_refuses_a_fifo_and_reads_a_file(tmp_path):
    from tokenflow.atomic import NotRegularFileError, open_regular, read_safetensors

    os.mkfifo(tmp_path / "flow.safetensors")
    done = _within_deadline(tmp_path / "flow.safetensors", lambda: read_safetensors(tmp_path / "flow.safetensors"))
    assert isinstance(done.get("error"), NotRegularFileError), done
    (tmp_path / "file").write_bytes(b"abc")
    with open_regular(tmp_path / "file") as fh:  # a regular file reads as usual, blocking mode restored
        assert fh.read() == b"abc" and os.get_blocking(fh.fileno())
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")


def _only_warning(caplog, folder: Path) -> None:
    """One warning, naming the cache folder and the fix."""
    warnings = [r.getMessage() for r in caplog.records if CACHE_WARNING in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert str(folder) in warnings[0] and "cache_dir=" in warnings[0] and "No space left" in warnings[0]


@pytest.mark.parametrize("when", ["fills-while-writing", "full-from-the-start"])
def test_a_full_cache_disk_costs_the_cache_not_the_run(when, tiny, small_disk, caplog):
    """4 frames at 128x128: 16 KiB a timestep slab; a 32 KiB disk holds the first slabs, not the four."""
    from tokenflow.storage.cache import InversionCache

    disk = small_disk("32k")
    if when == "full-from-the-start":
        with open(disk / "filler", "wb") as fh, pytest.raises(OSError):
            fh.write(b"\0" * (64 << 10))
    video = translation_clip(n=4, size=128)
    truth, _ = _invert(tiny, video, steps=4)
    with caplog.at_level(logging.WARNING):
        result, hit = _invert(tiny, video, InversionCache(disk / "inversions"), steps=4)
    assert not hit and torch.equal(result.latents, truth.latents)
    _only_warning(caplog, disk / "inversions")
    # no temporary, no half entry (lock files stay by design: InversionCache.lock)
    assert [p.name for p in (disk / "inversions").iterdir() if p.name != "locks"] == []


@pytest.mark.parametrize("when", ["fills-while-writing", "full-from-the-start"])
@pytest.mark.parametrize("chosen", ["$TMPDIR", "temp_dir="])
def test_a_full_temporary_folder_names_itself(chosen, when, tiny, small_disk, monkeypatch):
    """4 frames at 128x128, 4 steps: a 64 KiB trajectory in a 32 KiB temporary folder; the same one line whether
    the disk fills during the inversion or is full before it (tmpfs files are sparse: it fails at a write)."""
    from tokenflow.errors import StorageError

    disk = small_disk("32k")
    if when == "full-from-the-start":
        with open(disk / "filler", "wb") as fh, pytest.raises(OSError):
            fh.write(b"\0" * (64 << 10))
    if chosen == "$TMPDIR":
        monkeypatch.setattr(tempfile, "tempdir", str(disk))  # what $TMPDIR=<disk> gives tempfile
    with pytest.raises(StorageError) as caught:
        _invert(tiny, translation_clip(n=4, size=128), steps=4, temp_dir=None if chosen == "$TMPDIR" else str(disk))
    line = str(caught.value)
    if chosen == "$TMPDIR":
        expected = f"in the temporary folder {disk} ($TMPDIR): No space left on device — free space there or set TMPDIR="
    else:
        expected = f"in the temporary folder {disk}: No space left on device — free space there or give a temporary"
    assert line.startswith("cannot write the inversion trajectory (0.1 MiB) ") and expected in line, line
    assert "\n" not in line and [p.name for p in disk.iterdir()] == (["filler"] if when == "full-from-the-start" else [])
