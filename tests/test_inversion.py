"""DDIM inversion round trip, the content-addressed cache (hits skip the UNet; damage is recomputed)."""
from __future__ import annotations

import pytest
import torch

from conftest import UNetCounter
from tokenflow import DDIMInverter, InversionCache, invert_video, reconstruct
from tokenflow.models.ddim import ddim_timesteps
from tokenflow.errors import ConfigError
from tokenflow.storage.video import Video


def test_ddim_inversion_round_trips(tiny, clip8):
    video = Video(clip8.frames[:4], clip8.fps, clip8.source)
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
    assert len(list(tmp_path.glob("*.safetensors"))) == 4 and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


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


def _rewrite_manifest(path, change) -> None:
    """Edit the manifest in a safetensors file's header (as a hand or a tool might), keeping the tensors."""
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["manifest"])
    change(manifest)
    header["__metadata__"]["manifest"] = json.dumps(manifest)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def _swap_timesteps(m):
    m["timesteps"][0], m["timesteps"][1] = m["timesteps"][1], m["timesteps"][0]


@pytest.mark.parametrize("change", [
    _swap_timesteps,
    lambda m: m.update(prompt="a cat"),
    lambda m: m["settings"].update(n_steps=4000),
    lambda m: m.update(strides={"latents": [1, 1, 1, 1, 1]}),
], ids=["swapped-timesteps", "prompt", "settings", "strides"])
def test_tampered_manifest_is_recomputed_not_loaded(tiny, tmp_path, change):
    """The checksum covers the manifest too: an edited header is a miss, never a hit with other frames."""
    cache, inverter, video = InversionCache(tmp_path), DDIMInverter(n_steps=3, keep_steps=3), _clip()
    good, _ = invert_video(tiny, video, inverter, "x", cache, progress=False)
    path = next(tmp_path.glob("*.safetensors"))
    _rewrite_manifest(path, change)
    assert cache.load(path.stem) is None and not path.exists()  # refused and removed
    with UNetCounter(tiny.unet) as counter:
        again, hit = invert_video(tiny, video, inverter, "x", cache, progress=False)
    assert not hit and counter.calls == 3 and again.timesteps == good.timesteps
    assert torch.equal(again.latents, good.latents)


def test_untampered_manifest_round_trips(tiny, tmp_path):
    """Control for the test above: rewriting the header without a change still loads (the edit is what fails)."""
    cache, inverter, video = InversionCache(tmp_path), DDIMInverter(n_steps=3, keep_steps=3), _clip()
    good, _ = invert_video(tiny, video, inverter, "x", cache, progress=False)
    path = next(tmp_path.glob("*.safetensors"))
    _rewrite_manifest(path, lambda m: None)
    loaded = cache.load(path.stem)
    assert loaded is not None and loaded.timesteps == good.timesteps and torch.equal(loaded.latents, good.latents)


def test_same_weights_in_another_folder_hit_the_cache(tiny, cache_dir, tmp_path):
    """The key holds the weights' content, not their folder: a copy of the model folder hits the entry."""
    import shutil

    from tokenflow.models.loading import load_model
    from tokenflow.models.tiny import tiny_model_folder

    copy = tmp_path / "somewhere" / "else"
    shutil.copytree(tiny_model_folder(cache_dir), copy)
    moved = load_model(str(copy), device="cpu", dtype="float32")
    assert moved.identity != tiny.identity and moved.fingerprint == tiny.fingerprint
    cache, inverter, video = InversionCache(tmp_path / "cache"), DDIMInverter(n_steps=2, keep_steps=2), _clip()
    invert_video(tiny, video, inverter, "x", cache, progress=False)
    with UNetCounter(moved.unet) as counter:
        _, hit = invert_video(moved, video, inverter, "x", cache, progress=False)
    assert hit and counter.calls == 0


def test_cold_and_warm_cache_runs_are_identical(tiny, tmp_path):
    """An edit after computing the inversion equals, bit for bit, an edit after loading it from the cache.

    (The VAE returns channels-last latents; oneDNN rounds channels-last convolutions differently, so a
    cache that returned contiguous tensors changed a few pixels by one grey level.)
    """
    import numpy as np

    from tokenflow import TokenFlowPipeline
    from tokenflow.core.keyframes import RandomKeyframes
    from tokenflow.core.propagation import TokenFlowPropagator
    from tokenflow.editors import PnPEditor

    cache, video = InversionCache(tmp_path), _clip(n=2)

    def run():
        pipe = TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), RandomKeyframes(stride=1, seed=1),
                                 DDIMInverter(n_steps=3, keep_steps=3), n_steps=3, chunk_size=2, cache=cache)
        return pipe(video, "a fox", "ugly", "a wolf", progress=False)

    cold, warm = run(), run()
    assert (cold.timings["inversion_cache_hit"], warm.timings["inversion_cache_hit"]) == (0.0, 1.0)
    assert torch.equal(cold.latents, warm.latents) and np.array_equal(cold.frames, warm.frames)
