"""Benchmark the nearest-neighbour search backends on TokenFlow's correspondence shapes.

For Stable Diffusion's self-attention layers at 512x512 (tokens x width per frame: 4096x320,
1024x640, 256x1280), 8 frames are matched against each of 2 keyframes, mirroring the propagation
step: queries (2, 8*S, C) -- all frames' tokens, once per keyframe -- against keys (2, S, C).
Each backend is timed after a warm-up; peak memory, recall@1 against the exact torch search and
the mean similarity lost by approximate indexes are reported.

    python experiments/benchmark_search.py [--device cpu|cuda] [--repeats 3]
                                           [--dtype float32|float16] [--data video|random]

Synthetic "video" tokens (default): a clustered scene (S/16 clusters), keyframes = scene + small
noise; half of each frame's tokens are moved scene tokens + noise (tracked content, a clear
neighbour), half are fresh draws from the same clusters (new/deformed content, an ambiguous
within-cluster neighbour);
``--data random`` uses i.i.d. Gaussians (a worst case for approximate indexes).
CPU peak memory = max RSS sampled during the call minus RSS before it (psutil or /proc; else a
ru_maxrss delta, which only shows growth beyond the process's earlier peak). CUDA peak memory =
torch.cuda.max_memory_allocated delta (faiss GPU memory is not counted by torch's allocator).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenflow.core.search import (  # noqa: E402
    FaissNeighbourSearch, NeighbourSearch, TorchNeighbourSearch, faiss_available, recall_at_1,
)

SD_SHAPES = ((4096, 320), (1024, 640), (256, 1280))  # tokens x width per frame at 512x512


def make_tokens(tokens: int, width: int, frames: int = 8, keyframes: int = 2, data: str = "video",
                dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return queries (keyframes, frames*tokens, width) and keys (keyframes, tokens, width)."""
    gen = torch.Generator().manual_seed(seed)
    if data == "random":
        queries = torch.randn(frames * tokens, width, generator=gen).expand(keyframes, -1, -1)
        keys = torch.randn(keyframes, tokens, width, generator=gen)
    else:
        centers = torch.randn(max(1, tokens // 16), width, generator=gen)
        scene = centers[torch.randint(len(centers), (tokens,), generator=gen)]
        scene = scene + 0.5 * torch.randn(tokens, width, generator=gen)
        keys = scene + 0.1 * torch.randn(keyframes, tokens, width, generator=gen)
        moved = torch.cat([scene[torch.randperm(tokens, generator=gen)] for _ in range(frames)])
        moved = moved + 0.3 * torch.randn(moved.shape, generator=gen)
        fresh = centers[torch.randint(len(centers), (len(moved),), generator=gen)]
        fresh = fresh + 0.5 * torch.randn(moved.shape, generator=gen)
        tracked = torch.rand(len(moved), 1, generator=gen) < 0.5
        queries = torch.where(tracked, moved, fresh).expand(keyframes, -1, -1)
    return queries.contiguous().to(device, dtype), keys.to(device, dtype)


def _rss_reader() -> tuple[Callable[[], int] | None, str]:
    """A function returning the current RSS in bytes, and its name (None if unavailable)."""
    try:
        import psutil  # noqa: PLC0415 -- optional
        proc = psutil.Process()
        return (lambda: proc.memory_info().rss), "psutil rss"
    except ImportError:
        pass
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page
        return read, "/proc rss"
    return None, "ru_maxrss delta"


def _malloc_trim() -> None:
    """Release glibc's cached free memory (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class _PeakMemory:
    """Context manager measuring the peak memory growth (bytes) of the code inside it."""
    device: torch.device
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()  # hand freed heap back to the OS so RSS growth reflects this call
        self._read, _ = _rss_reader()
        if self._read is None:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return self
        self._base = self._max = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, self._read())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._read is None:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._read()) - self._base


@dataclass
class Timing:
    seconds: list[float]
    peak_bytes: int
    index: torch.Tensor
    similarity: torch.Tensor

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_search(search: NeighbourSearch, queries: torch.Tensor, keys: torch.Tensor,
                repeats: int = 3, warmup: int = 1) -> Timing:
    """Time ``search.search(queries, keys)`` ``repeats`` times after ``warmup`` calls; the peak
    memory is taken over the first timed call."""
    for _ in range(warmup):
        search.search(queries, keys)
    seconds, peak = [], 0
    for r in range(repeats):
        meter = _PeakMemory(queries.device) if r == 0 else None
        if meter:
            gc.collect()
            meter.__enter__()
        if queries.is_cuda:
            torch.cuda.synchronize(queries.device)
        start = time.perf_counter()
        index, sim = search.search(queries, keys)
        if queries.is_cuda:
            torch.cuda.synchronize(queries.device)
        seconds.append(time.perf_counter() - start)
        if meter:
            meter.__exit__(None, None, None)
            peak = meter.peak
    return Timing(seconds, peak, index, sim)


def default_backends() -> list[NeighbourSearch]:
    """torch blocked (the oracle, first), torch dense (official-style), faiss flat/ivf/hnsw."""
    backends: list[NeighbourSearch] = [TorchNeighbourSearch(), TorchNeighbourSearch(2**40)]
    backends[1].name = "torch-dense"
    if faiss_available():
        backends += [FaissNeighbourSearch(kind) for kind in ("flat", "ivf", "hnsw")]
    return backends


def benchmark(shapes=SD_SHAPES, device: str = "cpu", dtype: torch.dtype = torch.float32,
              repeats: int = 3, warmup: int = 1, data: str = "video",
              backends: list[NeighbourSearch] | None = None) -> list[dict]:
    """Run every backend on every (tokens, width) shape; one result row per pair. The first
    backend is the exact reference for recall and the time ratio."""
    backends = backends or default_backends()
    rows = []
    for tokens, width in shapes:
        queries, keys = make_tokens(tokens, width, data=data, dtype=dtype, device=device)
        ref: Timing | None = None
        for search in backends:
            t = time_search(search, queries, keys, repeats=repeats, warmup=warmup)
            ref = ref or t
            rows.append({
                "shape": f"{tokens}x{width}", "backend": search.name, "exact": search.exact,
                "seconds": t.median, "ratio": t.median / ref.median,
                "peak_mb": t.peak_bytes / 2**20,
                "recall": recall_at_1(t.index, ref.index),
                "sim_loss": (ref.similarity - t.similarity).mean().item(),
            })
            print(f"  {rows[-1]['shape']:>9} {search.name:<12} {t.median:8.3f}s", file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'shape':>9}  {'backend':<12} {'time s':>8} {'x torch':>8} {'peak MB':>9} "
            f"{'recall@1':>9} {'sim loss':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:>9}  {r['backend']:<12} {r['seconds']:8.3f} {r['ratio']:8.2f} "
                     f"{r['peak_mb']:9.1f} {r['recall']:9.4f} {r['sim_loss']:9.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--data", default="video", choices=("video", "random"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and faiss (OpenMP) threads; default: library defaults")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
        if faiss_available():
            import faiss  # noqa: PLC0415
            faiss.omp_set_num_threads(args.threads)
    rows = benchmark(device=args.device, dtype=getattr(torch, args.dtype),
                     repeats=args.repeats, warmup=args.warmup, data=args.data)
    memory = _rss_reader()[1] if args.device == "cpu" else "cuda allocator"
    print(f"device={args.device} dtype={args.dtype} data={args.data} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} memory={memory}")
    print("queries (2, 8*S, C) vs keys (2, S, C); time = median; x torch = time / torch time")
    print(format_table(rows))


if __name__ == "__main__":
    main()
