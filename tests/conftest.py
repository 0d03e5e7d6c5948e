"""Shared fixtures: the tiny model (built once per session), real and synthetic clips."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread per test process, subprocesses included: the tiny models are latency-bound, and two torch
# threads on a 2-core machine wait on each other (see ``one_thread``); the suite's parallelism is pytest-xdist's
# workers (``-n auto``), one process per core.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test videos not found at {DATA} (the shared data folder sits beside the repo only on the project's machines)")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where tiny models are built: $TOKENFLOW_CACHE (reused across runs) or a fresh temp dir."""
    env = os.environ.get("TOKENFLOW_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("tokenflow-cache")


@pytest.fixture(scope="session")
def tiny(cache_dir):
    from tokenflow.models.loading import load_model

    return load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir))


@pytest.fixture(scope="session")
def synthetic_inversion(tiny):
    """Factory ``(n_frames, n_steps, prompt) -> (Video, InversionResult)``: DDIM inversion of a 64x64
    :func:`translation_clip` (8 px = one latent token per frame) on the tiny model, memoised per session."""
    from tokenflow import DDIMInverter, invert_video

    memo: dict = {}

    def get(n_frames: int = 4, n_steps: int = 4, prompt: str = "a wolf"):
        key = (n_frames, n_steps, prompt)
        if key not in memo:
            video = translation_clip(n=n_frames, size=64, shift=8)
            inverter = DDIMInverter(n_steps=n_steps, keep_steps=n_steps)
            memo[key] = (video, invert_video(tiny, video, inverter, prompt, progress=False)[0])
        return memo[key]

    return get


@pytest.fixture(scope="session")
def wolf8():
    """The first 8 frames of wolf.mp4 at 128x128."""
    if not DATA.is_dir():
        pytest.skip(f"real test videos not found at {DATA}")
    from tokenflow.storage.video import read_video

    return read_video(DATA / "wolf.mp4", n_frames=8, height=128, width=128)


@pytest.fixture(scope="session", params=["synthetic", "wolf"])
def clip8(request):
    """8 frames at 128x128: a smooth texture moving 2 px per frame (``synthetic``: runs on every clone), and the
    first 8 frames of wolf.mp4 (``wolf``: skips without ../shared). A test on both checks the real case where it can
    and never leaves a user's clone without the check."""
    if request.param == "wolf":
        return request.getfixturevalue("wolf8")
    from tokenflow.storage.video import Video

    return Video(translating_clip(n=8, h=128, w=128, shift=2, seed=3), fps=10.0, source="synthetic-texture")


class UNetCounter:
    """Counts UNet forward calls and batch elements through a forward pre-hook (a context manager)."""

    def __init__(self, unet):
        self.calls, self.samples = 0, 0
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1
        self.samples += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def translating_clip(n: int = 12, h: int = 64, w: int = 128, shift: int = 2, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8: a smooth random texture moving left by ``shift`` px per frame."""
    import cv2

    rng = np.random.default_rng(seed)
    canvas_w = w + shift * n
    coarse = rng.uniform(0, 255, (h // 8, canvas_w // 8 + 1, 3)).astype(np.float32)
    canvas = cv2.resize(coarse, (canvas_w, h), interpolation=cv2.INTER_CUBIC)
    return np.stack([np.clip(canvas[:, t * shift : t * shift + w], 0, 255).astype(np.uint8) for t in range(n)])


def translation_clip(n: int = 4, size: int = 128, shift: int = 8, seed: int = 0):
    """A Video whose frame i is a textured image circularly shifted right by ``i * shift`` pixels."""
    from tokenflow.storage.video import Video

    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(-1, 1, (1, 3, size // 8, size // 8)).astype(np.float32))
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    image = image + 0.3 * torch.from_numpy(rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32))
    frames = torch.cat([torch.roll(image, shifts=i * shift, dims=3) for i in range(n)]).clamp(-1, 1)
    return Video.from_tensor(frames, fps=10.0, source="synthetic-translation")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while this module runs: tiny models are latency-bound, and with two threads on a busy
    2-core machine torch's workers wait on each other (measured: the sd21-base matrix of tests/test_variants.py
    took 198 s of CPU with 2 threads under load, 8.6 s with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def failing_half_way(monkeypatch):
    """A context manager: inside it ``Path.write_text`` writes the first half of its text, then fails as a full disk
    does (ENOSPC) — what an atomic write must survive with the previous file whole."""
    import contextlib

    real_write = Path.write_text

    def half_then_full(self, data, *args, **kwargs):
        real_write(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    @contextlib.contextmanager
    def failing():
        with monkeypatch.context() as m:
            m.setattr(Path, "write_text", half_then_full)
            yield
    return failing


@pytest.fixture
def small_disk(tmp_path):
    """Factory ``(size) -> folder``: a tmpfs of ``size`` (e.g. "64k") mounted in ``tmp_path`` — a real full disk
    (ENOSPC from the kernel). Skips where mounting is not permitted (not root, or no tmpfs); always unmounted."""
    import shutil
    import subprocess

    mounted: list[Path] = []

    def make(size: str) -> Path:
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("a small full disk needs `mount -t tmpfs` as root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
