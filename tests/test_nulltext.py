"""Null-text inversion: better reconstruction under guidance than DDIM, per-frame batching, caching, use by editors."""
from __future__ import annotations

import pytest
import torch

from conftest import UNetCounter, DATA, needs_data, translating_clip
from tokenflow.editors import PnPEditor, SDEditEditor
from tokenflow import (DDIMInverter, InversionCache, NoPropagation, NullTextInverter, TokenFlowPipeline, invert_video,
                       sample_with_null_text)
from tokenflow.models.ddim import ddim_timesteps
from tokenflow.core.editor import EditInputs, Step
from tokenflow.errors import ConfigError
from tokenflow.core.inversion import sample
from tokenflow.storage.video import Video

STEPS = 5


def _clip(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Video.from_tensor(torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, fps=10.0, source=f"random-{seed}")


@pytest.fixture(scope="module")
def null_inversion(tiny):
    return invert_video(tiny, _clip(), NullTextInverter(n_steps=STEPS, inner_steps=3), "a texture", progress=False)[0]


@pytest.mark.parametrize("clip", ["synthetic", pytest.param("wolf", marks=needs_data)])
def test_null_text_reconstructs_under_guidance_better_than_ddim(tiny, clip):
    from tokenflow.storage.video import read_video

    video = (read_video(DATA / "wolf.mp4", n_frames=2, height=64, width=64) if clip == "wolf" else
             Video(translating_clip(n=2, h=64, w=64, shift=2, seed=3), fps=10.0, source="synthetic-texture"))
    steps, g = 10, 7.5
    ddim, _ = invert_video(tiny, video, DDIMInverter(n_steps=steps, keep_steps=steps), "a wolf", progress=False)
    null, _ = invert_video(tiny, video, NullTextInverter(n_steps=steps, guidance_scale=g), "a wolf", progress=False)
    cond, empty = tiny.encode_text("a wolf"), tiny.encode_text("")
    plain = sample(tiny, ddim.latents[0], ddim.timesteps, cond, empty, guidance_scale=g, progress=False)
    optimised = sample_with_null_text(tiny, null, cond, guidance_scale=g, progress=False)
    error = lambda z: float((z - ddim.clean).norm() / ddim.clean.norm())
    # measured (2 wolf frames at 64x64, 10 steps, guidance 7.5): DDIM 0.223, null-text 0.093 (DDIM at guidance 1: 0.056)
    assert torch.equal(null.latents, ddim.latents)  # the same DDIM trajectory underneath
    assert error(optimised) < 0.6 * error(plain), (error(optimised), error(plain))


def test_batched_optimisation_equals_frame_by_frame(tiny, null_inversion):
    one_by_one, _ = invert_video(tiny, _clip(), NullTextInverter(n_steps=STEPS, inner_steps=3, batch_size=1), "a texture",
                                 progress=False)
    table = null_inversion.null_text.table
    assert table.shape == (STEPS, 2, 77, tiny.text_encoder.config.hidden_size)
    # Adam normalises each gradient element, so float noise of the batched UNet shows up at ~2e-5 (measured);
    # the optimisation itself moves the embeddings by ~3e-2 per step
    assert torch.allclose(table, one_by_one.null_text.table, atol=1e-4)
    assert float((table[0] - tiny.encode_text("").hidden).abs().max()) > 1e-2
    assert not torch.equal(table[:, 0], table[:, 1])  # each frame its own embeddings


def test_cache_round_trips_null_embeddings_without_the_unet(tiny, tmp_path):
    cache, inverter, video = InversionCache(tmp_path), NullTextInverter(n_steps=3, inner_steps=2, early_stop=1e3), _clip()
    with UNetCounter(tiny.unet) as miss:
        first, hit1 = invert_video(tiny, video, inverter, "x", cache, progress=False)
    with UNetCounter(tiny.unet) as hit:
        second, hit2 = invert_video(tiny, video, inverter, "x", cache, progress=False)
    # early_stop=1e3 stops every inner loop after one Adam step: per step 1 cond + 1 fitted + 1 advancing call
    assert (hit1, hit2) == (False, True) and miss.calls == 3 + 3 * 3 and hit.calls == 0
    assert torch.equal(first.null_text.table, second.null_text.table)
    assert second.null_text.guidance_scale == inverter.config.guidance_scale
    assert second.settings == inverter.settings() and second.settings["inverter"] == "nulltext"
    assert not any(p.requires_grad or p.grad is not None for p in tiny.unet.parameters())
    with UNetCounter(tiny.unet) as other:  # every setting is part of the key
        invert_video(tiny, video, NullTextInverter(n_steps=3, inner_steps=2, early_stop=1e3, lr=0.02), "x", cache,
                     progress=False)
    assert other.calls > 0


def test_editors_use_null_embeddings_and_refuse_a_negative_prompt(tiny, null_inversion):
    grid = ddim_timesteps(tiny.scheduler, STEPS)
    step = Step(1, grid[1], STEPS, "frames", torch.tensor([1]), torch.tensor([], dtype=torch.long))
    for editor in (SDEditEditor(), PnPEditor()):
        editor.prepare(EditInputs(tiny, null_inversion, "a red texture", "", "a texture", grid))
        uncond = editor.branches(step)[0]
        assert uncond.name == "uncond" and torch.equal(uncond.embedding.hidden, null_inversion.null_text.table[1])
        with pytest.raises(ConfigError, match="negative_prompt='ugly' cannot be used with a null-text inversion"):
            editor.prepare(EditInputs(tiny, null_inversion, "a red texture", "ugly", "a texture", grid))


def test_guidance_scale_mismatch_warns(tiny, null_inversion, caplog):
    grid = ddim_timesteps(tiny.scheduler, STEPS)
    with caplog.at_level("WARNING"):
        PnPEditor(guidance_scale=3.0).prepare(EditInputs(tiny, null_inversion, "a red texture", "", "a texture", grid))
    assert "optimised for guidance 7.50 but the editor guides with 3.00" in caplog.text


def test_sdedit_at_full_strength_on_null_text_equals_null_text_sampling(tiny, null_inversion):
    """Per-frame embedding tables reach the right frames through the pipeline (chunks of one frame)."""
    pipe = TokenFlowPipeline(tiny, SDEditEditor(strength=1.0), NoPropagation(), n_steps=STEPS, chunk_size=1)
    edited = pipe.edit(null_inversion, "a texture", "", progress=False).latents
    reference = sample_with_null_text(tiny, null_inversion, tiny.encode_text("a texture"), 7.5, progress=False)
    assert torch.allclose(edited, reference, atol=1e-4), float((edited - reference).abs().max())


def test_reconstruction_needs_null_embeddings(tiny):
    ddim, _ = invert_video(tiny, _clip(n=1), DDIMInverter(n_steps=2, keep_steps=2), "x", progress=False)
    with pytest.raises(ConfigError, match="no null-text embeddings"):
        sample_with_null_text(tiny, ddim, tiny.encode_text("x"), progress=False)


@pytest.mark.parametrize("bad", [dict(n_steps=0), dict(n_steps=500), dict(inner_steps=0), dict(batch_size=0), dict(lr=0.0),
                                 dict(early_stop=-1.0), dict(guidance_scale=0.5)])
def test_bad_settings(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        NullTextInverter(**bad)


def test_the_table_lives_on_disk_and_nothing_reads_whole_tensors(tiny, tmp_path, monkeypatch):
    """invert_video keeps the null-text table, like the trajectory, in a file written one fitted step at a time:
    the same table as the in-RAM inversion, bit for bit; no T x N tensor of latents or embeddings is ever built
    (whole-store reads raise here); a cache hit reads it from the entry one step at a time."""
    from tokenflow.models.trajectory import FileTrajectory, TensorTrajectory

    inverter, video = NullTextInverter(n_steps=3, inner_steps=2), _clip(3)
    from tokenflow.core.video_inversion import encode_video

    in_ram = inverter.invert(tiny, encode_video(tiny, video), "x", progress=False)
    assert isinstance(in_ram.null_text.store, TensorTrajectory)

    def whole(self):
        raise AssertionError("a whole trajectory or table was read")

    writes = []
    real_write = FileTrajectory.write

    def spy(self, i, start, rows):
        if self.shape[2] == 1:  # the table store (T, N, 1, L, D)
            writes.append((i, start, tuple(rows.shape)))
        return real_write(self, i, start, rows)

    monkeypatch.setattr(FileTrajectory, "tensor", whole)
    monkeypatch.setattr(TensorTrajectory, "tensor", whole)
    monkeypatch.setattr(FileTrajectory, "write", spy)
    cache = InversionCache(tmp_path)
    computed, hit = invert_video(tiny, video, inverter, "x", cache, progress=False)
    loaded, hit2 = invert_video(tiny, video, inverter, "x", cache, progress=False)
    monkeypatch.undo()
    assert (hit, hit2) == (False, True)
    assert isinstance(computed.null_text.store, FileTrajectory) and isinstance(loaded.null_text.store, FileTrajectory)
    width = tiny.text_encoder.config.hidden_size
    assert sorted(writes) == [(i, 0, (3, 1, 77, width)) for i in range(3)]  # one batch: each step written once
    for i in range(3):
        assert torch.equal(computed.null_text.step(i), in_ram.null_text.step(i))
        assert torch.equal(loaded.null_text.step(i), in_ram.null_text.step(i))
        assert torch.equal(loaded.null_text.step(i, [2, 0]), in_ram.null_text.table[i, [2, 0]])
