"""Storage faults that must not lose a run or hand it wrong data: forged cache entries, a FIFO in a cache
entry's place, a cache disk that is or becomes full, a full temporary folder.

Full disks are real ones (a small tmpfs, :func:`conftest.small_disk`; skipped where mounting is not
permitted). The inversions are the tiny model's, 4 frames, 2-4 DDIM steps.
"""
from __future__ import annotations

import logging
import os
import threading

import pytest
import torch

from conftest import translation_clip

CACHE_WARNING = "cannot write the inversion cache"


def _invert(tiny, video, cache=None, steps: int = 2, **kwargs):
    from tokenflow import DDIMInverter, invert_video

    return invert_video(tiny, video, DDIMInverter(n_steps=steps, keep_steps=steps), "a wolf", cache, progress=False,
                        **kwargs)


def _key(tiny, video, steps: int = 2) -> str:
    from tokenflow import DDIMInverter
    from tokenflow.storage.cache import cache_key
    from tokenflow.storage.video import video_fingerprint

    inverter = DDIMInverter(n_steps=steps, keep_steps=steps)
    return cache_key(video=video_fingerprint(video), model=tiny.fingerprint, inverter=inverter.settings(),
                     prompt="a wolf")


@pytest.mark.parametrize("forgery", ["timesteps-swapped", "prompt", "frames"])
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
    else:  # a third frame: the latents of another clip
        forged = InversionResult(truth.timesteps, torch.cat([latents, latents[:, :1]], 1),
                                 torch.cat([truth.clean, truth.clean[:1]]), truth.prompt, truth.settings)
    assert cache.save(_key(tiny, video), forged) is not None  # checksum recomputed: the file verifies
    with caplog.at_level(logging.WARNING):
        again, hit = _invert(tiny, video, cache)
    assert not hit and "does not match this inversion" in caplog.text
    assert again.timesteps == truth.timesteps and torch.equal(again.latents, latents)
    assert _invert(tiny, video, cache)[1]  # the recomputed entry replaced the forged one


def test_a_fifo_in_place_of_a_cache_entry_does_not_hang(tiny, tmp_path, caplog):
    from tokenflow.storage.atomic import NotRegularFileError, read_safetensors
    from tokenflow.storage.cache import InversionCache

    video = translation_clip(n=2, size=64)
    cache = InversionCache(tmp_path / "inversions")
    cache.directory.mkdir()
    os.mkfifo(cache.path(_key(tiny, video)))
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=cache.load(_key(tiny, video))), daemon=True)
    with caplog.at_level(logging.WARNING):
        worker.start()
        worker.join(timeout=20)
    assert not worker.is_alive(), "InversionCache.load blocked on a FIFO"
    assert result["out"] is None and "cannot be read" in caplog.text
    os.mkfifo(tmp_path / "t1.safetensors")
    with pytest.raises(NotRegularFileError, match="is not a regular file"):
        read_safetensors(tmp_path / "t1.safetensors")


def _only_warning(caplog) -> None:
    assert caplog.text.count(CACHE_WARNING) == 1, caplog.text


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
    _only_warning(caplog)
    assert [p.name for p in (disk / "inversions").iterdir()] == []  # no temporary, no half entry


@pytest.mark.parametrize("when", ["fills-while-writing", "full-from-the-start"])
def test_a_full_temporary_folder_names_itself(when, tiny, small_disk):
    from tokenflow.errors import StorageError

    disk = small_disk("32k")
    if when == "full-from-the-start":
        with open(disk / "filler", "wb") as fh, pytest.raises(OSError):
            fh.write(b"\0" * (64 << 10))
    with pytest.raises(StorageError) as caught:
        _invert(tiny, translation_clip(n=4, size=128), steps=4, temp_dir=str(disk))
    line = str(caught.value)
    assert f"in the temporary folder {disk} ($TMPDIR)" in line and "No space left on device" in line
    assert "0.1 MiB" in line and "set TMPDIR=" in line and "\n" not in line
