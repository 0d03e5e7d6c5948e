"""DDIM inversion round trip, the content-addressed cache (hits skip the UNet; damage is recomputed)."""
from __future__ import annotations

import pytest
import torch

from conftest import UNetCounter, needs_data
from tokenflow import DDIMInverter, InversionCache, invert_video, reconstruct
from tokenflow.models.ddim import ddim_timesteps
from tokenflow.errors import ConfigError
from tokenflow.storage.video import Video


@needs_data
def test_ddim_inversion_round_trips(tiny, wolf8):
    video = Video(wolf8.frames[:4], wolf8.fps, wolf8.source)
    inversion, _ = invert_video(tiny, video, DDIMInverter(n_steps=50), "a wolf", progress=False)
    assert inversion.timesteps == ddim_timesteps(tiny.scheduler, 50) and inversion.latents.shape[:2] == (50, 4)
    recon = reconstruct(tiny, inversion, progress=False)
    error = float((recon - inversion.clean).norm() / inversion.clean.norm())
    assert error < 0.05, error  # measured 0.022 with the damped tiny UNet (0.63 undamped)


def test_inverter_keeps_the_editing_grid_and_final_latent(tiny):
    inverter = DDIMInverter(n_steps=500, keep_steps=50, keep_final=True)
    kept = inverter.kept_timesteps(tiny.scheduler)
    assert kept[0] == 999 and kept[1:] == ddim_timesteps(tiny.scheduler, 50) and len(kept) == 51


@pytest.mark.parametrize("bad", [dict(n_steps=-1), dict(n_steps=0), dict(keep_steps=60, n_steps=50), dict(batch_size=0)])
def test_bad_inverter_settings(bad):
    with pytest.raises(ConfigError):
        DDIMInverter(**bad)


def test_keep_grid_must_be_visited(tiny):
    with pytest.raises(ConfigError, match="never visits"):
        DDIMInverter(n_steps=30, keep_steps=20).kept_timesteps(tiny.scheduler)


def _clip(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return Video.from_tensor(torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, fps=10.0, source=f"random-{seed}")


def test_cache_hit_skips_the_unet_and_returns_the_same_latents(tiny, tmp_path):
    cache, inverter, video = InversionCache(tmp_path), DDIMInverter(n_steps=4, keep_steps=4), _clip()
    with UNetCounter(tiny.unet) as miss:
        first, hit1 = invert_video(tiny, video, inverter, "x", cache, progress=False)
    with UNetCounter(tiny.unet) as hit:
        second, hit2 = invert_video(tiny, video, inverter, "x", cache, progress=False)
    assert (hit1, hit2) == (False, True)
    assert miss.calls == 4 and hit.calls == 0
    assert torch.equal(first.latents, second.latents) and second.timesteps == first.timesteps
    # any change of content, prompt or settings is a different entry
    with UNetCounter(tiny.unet) as other:
        invert_video(tiny, _clip(seed=1), inverter, "x", cache, progress=False)
        invert_video(tiny, video, inverter, "y", cache, progress=False)
        invert_video(tiny, video, DDIMInverter(n_steps=8, keep_steps=4), "x", cache, progress=False)
    assert other.calls == 4 + 4 + 8
    assert len(list(tmp_path.glob("*.safetensors"))) == 4 and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_cache_entry_is_recomputed_not_loaded(tiny, tmp_path, damage):
    cache, inverter, video = InversionCache(tmp_path), DDIMInverter(n_steps=3, keep_steps=3), _clip()
    good, _ = invert_video(tiny, video, inverter, "x", cache, progress=False)
    path = next(tmp_path.glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    with UNetCounter(tiny.unet) as counter:
        again, hit = invert_video(tiny, video, inverter, "x", cache, progress=False)
    assert not hit and counter.calls == 3
    assert torch.equal(again.latents, good.latents)
    assert cache.load(path.stem) is not None  # rewritten whole
