"""Any length in bounded memory: the inversion trajectory on disk read one step at a time, outputs written as
decoded, nothing half-written published, and the long-video preset."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import translation_clip
from tokenflow import DDIMInverter, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator, invert_video
from tokenflow.editors import PnPEditor
from tokenflow.models.trajectory import FileTrajectory, InversionResult, TensorTrajectory
from tokenflow.storage.cache import HEADER_ROOM, InversionCache
from tokenflow.storage.mp4 import VideoWriter, write_video
from tokenflow.storage.png import FrameWriter, write_frames
from tokenflow.storage.video import read_video

STEPS = 2


def _pipeline(tiny, cache=None):
    return TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), RandomKeyframes(stride=2, seed=1),
                             DDIMInverter(n_steps=STEPS, keep_steps=STEPS), n_steps=STEPS, chunk_size=2, cache=cache)


@pytest.fixture(scope="module")
def clip():
    return translation_clip(n=4, size=64, shift=8)


@pytest.fixture(scope="module")
def in_ram(tiny, clip):
    """The inversion computed entirely in RAM (a TensorTrajectory), and the edit from it."""
    from tokenflow.core.video_inversion import encode_video

    inversion = DDIMInverter(n_steps=STEPS, keep_steps=STEPS).invert(tiny, encode_video(tiny, clip), "a wolf",
                                                                       progress=False)
    assert isinstance(inversion.trajectory, TensorTrajectory)
    return inversion, _pipeline(tiny).edit(inversion, "a fox", "ugly", progress=False)


def test_file_backed_trajectory_gives_the_same_edit_bit_for_bit(tiny, clip, in_ram, tmp_path):
    """Temporary file, freshly written cache entry and loaded cache entry: the same latents at every step and
    the same edit, bit for bit, as the in-RAM trajectory. Catches wrong offsets, slab order, row selection."""
    ram, ram_edit = in_ram
    cache = InversionCache(tmp_path)
    fresh_temp, _ = invert_video(tiny, clip, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", progress=False)
    fresh_cached, hit = invert_video(tiny, clip, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", cache,
                                     progress=False)
    loaded, hit2 = invert_video(tiny, clip, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", cache,
                                progress=False)
    assert (hit, hit2) == (False, True)
    for inversion in (fresh_temp, fresh_cached, loaded):
        assert isinstance(inversion.trajectory, FileTrajectory)
        assert inversion.timesteps == ram.timesteps and torch.equal(inversion.clean, ram.clean)
        for t in ram.timesteps:
            assert torch.equal(inversion.at(t), ram.at(t))
            assert torch.equal(inversion.at(t, torch.tensor([3, 0, 1])), ram.at(t)[[3, 0, 1]])
    for inversion in (fresh_temp, loaded):  # fresh_cached reads the same kind of store as fresh_temp
        edit = _pipeline(tiny).edit(inversion, "a fox", "ugly", progress=False)
        assert torch.equal(edit.latents, ram_edit.latents) and np.array_equal(edit.frames, ram_edit.frames)
    assert (ram_edit.latents - ram.clean).abs().max() > 0.05  # the edit did something


def test_reading_a_step_reads_only_that_slab(tmp_path):
    """Slab i (or some of its rows) comes back exactly, and exactly those bytes are read from the file."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(5, 6, 4, 3, 2, generator=g)
    store = FileTrajectory.temporary(tuple(data.shape), folder=tmp_path)
    for i in range(5):  # written as an inverter does: chunks of frames per timestep
        store.write(i, 0, data[i, :4])
        store.write(i, 4, data[i, 4:])
    row = 4 * 3 * 2 * 4
    assert store.slab_bytes == 6 * row and not list(tmp_path.iterdir())  # anonymous: no name left behind
    for i in (3, 0, 4):
        before = store.bytes_read
        assert torch.equal(store.read(i), data[i]) and store.bytes_read - before == 6 * row
        before = store.bytes_read
        assert torch.equal(store.read(i, [5, 1, 2]), data[i, [5, 1, 2]]) and store.bytes_read - before == 3 * row
    assert torch.equal(InversionResult([9, 7, 5, 3, 1], store, data[0], "", {}).latents, data)


def test_edit_reads_the_trajectory_one_step_at_a_time(tiny, clip, tmp_path):
    """A loaded entry is verified without touching the trajectory store; the edit then reads only the source
    rows it needs, step by step: (steps) x (frames) rows in all, never the whole trajectory per step."""
    cache = InversionCache(tmp_path)
    invert_video(tiny, clip, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", cache, progress=False)
    loaded, hit = invert_video(tiny, clip, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", cache,
                               progress=False)
    store = loaded.trajectory
    assert hit and store.bytes_read == 0
    reads: list[tuple[int, int]] = []
    real = store._pread
    store._pread = lambda buffer, at: (reads.append((at, len(buffer))), real(buffer, at))[1]
    _pipeline(tiny).edit(loaded, "a fox", "ugly", progress=False)
    row = store.slab_bytes // clip.n_frames
    # the initial latent (noisiest slab) once, then the source branch's rows of each call, each step
    assert store.bytes_read == (clip.n_frames + STEPS * clip.n_frames) * row
    for at, n in reads:  # every read stays inside one slab
        first, last = (at - store.offset) // store.slab_bytes, (at + n - 1 - store.offset) // store.slab_bytes
        assert first == last


def test_cache_entry_is_checked_in_its_streamed_part(tiny, clip, tmp_path):
    """A byte flipped inside the trajectory (written slab by slab, verified by streaming) is a miss."""
    cache = InversionCache(tmp_path)
    invert_video(tiny, clip, DDIMInverter(n_steps=2, keep_steps=2), "a wolf", cache, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    assert cache.load(path.stem) is not None
    data = bytearray(path.read_bytes())
    data[8 + HEADER_ROOM + 100] ^= 0x01
    path.write_bytes(bytes(data))
    assert cache.load(path.stem) is None and not path.exists()


def test_failed_inversion_publishes_no_entry(tiny, clip, tmp_path, monkeypatch):
    """An exception after some slabs were written leaves no entry and no temporary file."""
    cache, calls = InversionCache(tmp_path), []
    real = tiny.predict

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second timestep: after the first slab was written
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny, "predict", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        invert_video(tiny, clip, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", cache, progress=False)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["locks"])  # no entry, no temporary; only the lock file


KILLED_ENTRY = textwrap.dedent("""
    import sys, time, torch
    from tokenflow.storage.cache import InversionCache
    writer = InversionCache(sys.argv[1]).writer("k" * 32, (3, 2, 4, 8, 8))
    writer.trajectory.write(0, 0, torch.ones(2, 4, 8, 8))
    print("written", flush=True)
    time.sleep(60)
""")
KILLED_VIDEO = textwrap.dedent("""
    import sys, time, numpy as np
    from tokenflow.storage.mp4 import VideoWriter
    from tokenflow.storage.png import FrameWriter
    with VideoWriter(sys.argv[1] + "/edited.mp4", 10.0) as mp4, FrameWriter(sys.argv[1] + "/frames") as pngs:
        frames = np.zeros((4, 64, 64, 3), np.uint8)
        mp4.write(frames)
        pngs.write(frames)
        print("written", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("script", [KILLED_ENTRY, KILLED_VIDEO], ids=["cache-entry", "video-and-frames"])
def test_killed_writer_publishes_nothing(script, tmp_path):
    """SIGKILL mid-write: nothing under a final name; what is left is a temporary that remove_stale deletes."""
    import psutil

    from tokenflow.atomic import remove_stale

    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    helpers = psutil.Process(proc.pid).children(recursive=True)  # the encoder: it outlives a killed parent
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(helpers, timeout=30)  # an orphaned ffmpeg may still create its temporary file meanwhile
    left = list(tmp_path.iterdir())
    assert left and all(p.name.startswith(".") and ".tmp-" in p.name for p in left)
    assert InversionCache(tmp_path).load("k" * 32) is None
    remove_stale(tmp_path)
    assert not list(tmp_path.iterdir())


def test_streaming_writers_equal_the_batch_writers(tmp_path):
    """VideoWriter fed in uneven chunks decodes to the same frames as write_video; FrameWriter's PNGs are the
    same files as write_frames'."""
    frames = translation_clip(n=7, size=64, shift=8).frames
    write_video(tmp_path / "batch.mp4", frames, 10.0)
    write_frames(tmp_path / "batch", frames)
    with VideoWriter(tmp_path / "stream.mp4", 10.0) as mp4, FrameWriter(tmp_path / "stream") as pngs:
        for lo, hi in ((0, 3), (3, 4), (4, 7)):
            mp4.write(frames[lo:hi])
            pngs.write(frames[lo:hi])
    batch, stream = read_video(tmp_path / "batch.mp4"), read_video(tmp_path / "stream.mp4")
    assert stream.n_frames == 7 and np.array_equal(batch.frames, stream.frames)
    names = sorted(p.name for p in (tmp_path / "batch").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "stream").iterdir()) and len(names) == 7
    assert all((tmp_path / "batch" / n).read_bytes() == (tmp_path / "stream" / n).read_bytes() for n in names)


def test_exception_mid_write_publishes_nothing(tmp_path):
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    with pytest.raises(RuntimeError, match="decoder failed"):
        with VideoWriter(tmp_path / "edited.mp4", 10.0) as mp4, FrameWriter(tmp_path / "frames") as pngs:
            mp4.write(frames)
            pngs.write(frames)
            raise RuntimeError("decoder failed")
    assert not list(tmp_path.iterdir())


def test_edit_streams_its_frames_to_the_writers(tiny, clip, in_ram, tmp_path):
    """output= gets the decoded frames: the PNGs are the gathered frames exactly; keep_frames=False keeps none."""
    from PIL import Image

    inversion, expected = in_ram
    with VideoWriter(tmp_path / "edited.mp4", 10.0) as mp4, FrameWriter(tmp_path / "frames") as pngs:
        result = _pipeline(tiny).edit(inversion, "a fox", "ugly", progress=False, output=[mp4, pngs],
                                      keep_frames=False)
    assert result.frames is None and torch.equal(result.latents, expected.latents)
    written = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "frames").iterdir())])
    assert np.array_equal(written, expected.frames)
    assert read_video(tmp_path / "edited.mp4").n_frames == clip.n_frames


def test_decoding_goes_to_the_sinks_one_vae_batch_at_a_time(tiny, in_ram):
    """decode_frames hands out vae_batch frames at a time, equal to decoding all at once (same batches)."""
    from tokenflow.core.pipeline import decode_frames
    from tokenflow.storage.video import frames_from_tensor

    latents = in_ram[1].latents
    chunks: list[np.ndarray] = []

    class Sink:
        def write(self, frames: np.ndarray) -> None:
            chunks.append(frames)

    tiny.vae_batch, batch = 3, tiny.vae_batch
    try:
        kept = decode_frames(tiny, latents, [Sink()], keep=True)
        whole = frames_from_tensor(tiny.decode_latents(latents))
        assert decode_frames(tiny, latents, [], keep=False) is None
    finally:
        tiny.vae_batch = batch
    assert [len(c) for c in chunks] == [3, 1]
    assert np.array_equal(np.concatenate(chunks), whole) and np.array_equal(kept, whole)


def test_long_video_preset_composes_and_runs(tiny, tmp_path):
    """experiment=long_video: bounded keyframe attention, no in-memory metrics; its parts build and edit."""
    from hydra import compose, initialize_config_module

    import tokenflow.cli.config  # noqa: F401  registers the run schema
    from tokenflow.instantiation import build

    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        cfg = compose(config_name="edit", overrides=["video=x.mp4", "model=tiny", "experiment=long_video",
                                                     f"n_steps={STEPS}", "keyframe_stride=2", "chunk_size=2"])
    parts = {name: build(cfg[name]) for name in ("inverter", "editor", "propagator", "keyframes", "attention")}
    metrics = build(cfg.metrics)
    assert parts["attention"].bounded and metrics.metrics == {}
    video = translation_clip(n=10, size=64, shift=8)  # 5 keyframes: 4 anchors and segments
    pipe = TokenFlowPipeline(tiny, parts["editor"], parts["propagator"], parts["keyframes"], parts["inverter"],
                             n_steps=STEPS, chunk_size=cfg.chunk_size, attention=parts["attention"])
    with VideoWriter(tmp_path / "edited.mp4", 10.0) as mp4:
        result = pipe(video, "a fox", "ugly", "a wolf", progress=False, output=mp4, keep_frames=False)
    assert result.frames is None and torch.isfinite(result.latents).all()
    assert read_video(tmp_path / "edited.mp4").n_frames == 10


def test_preflight_names_the_long_video_preset_when_memory_grows_with_length(tiny, caplog):
    """The estimate at 480 frames with unbounded attention is well above 24 frames': one warning naming the
    preset; bounded attention (anchors) at the same length: no warning."""
    from tokenflow.cli.preflight import LENGTH_GROWTH_WARNING, warn_length_growth
    from tokenflow.core.memory import ModelShape, RunShape, current_rss

    shape = ModelShape.from_model(tiny)
    default = RunShape(480, 256, 256, 50, branches=3, keyframes=60, chunk_size=8, held_keyframes=60)
    bounded = RunShape(480, 256, 256, 50, branches=3, keyframes=4, chunk_size=8, held_keyframes=9, anchors=4)
    with caplog.at_level("WARNING", logger="tokenflow"):
        growth = warn_length_growth(shape, default, current_rss())
        assert growth > LENGTH_GROWTH_WARNING and "experiment=long_video" in caplog.text
        caplog.clear()
        assert warn_length_growth(shape, bounded, current_rss()) < growth and not caplog.text
        assert warn_length_growth(shape, RunShape(24, 256, 256, 50, keyframes=3), current_rss()) == 1.0
