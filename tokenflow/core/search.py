"""Nearest-neighbour search between token sets (TokenFlow's correspondence step).

TokenFlow propagates edited self-attention tokens along nearest-neighbour correspondences: for
every token of a frame (a vector of ``C`` channels) it finds the most cosine-similar token among a
keyframe's tokens. The official code does one dense ``(B*S) x (2*S)`` matmul + argmax; the
backends here bound the memory of that step and make it pluggable:

* :class:`TorchNeighbourSearch` -- exact, blocked matmul + max (the reference oracle).
* :class:`FaissNeighbourSearch` -- faiss ``flat`` (exact), ``ivf`` / ``hnsw`` (approximate),
  on GPU when the faiss GPU build is installed and the tensors live on CUDA.
* :class:`AutoNeighbourSearch` -- the faster exact backend, measured once per shape.
* :func:`make_search` -- pick a backend by name (``"auto"``, ``"faiss"``, ``"torch"``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenflow.errors import ConfigError

__all__ = [
    "NeighbourSearch", "TorchNeighbourSearch", "FaissNeighbourSearch", "make_search",
    "faiss_available", "recall_at_1", "SEARCHES",
]

FAISS_INDEXES = ("flat", "ivf", "hnsw")
_NO_FAISS = ("faiss is not installed — pip install 'tokenflow-video[cpu]' (faiss-cpu) or '[gpu]' "
             "(faiss-gpu), or use search=torch")


def _import_faiss() -> Any:
    """Return the faiss module, or raise :class:`ConfigError` when it cannot be imported."""
    try:
        import faiss  # noqa: PLC0415 -- optional dependency
    except ImportError as exc:
        raise ConfigError(_NO_FAISS) from exc
    return faiss


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        _import_faiss()
    except ConfigError:
        return False
    return True


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid — use a positive integer")
    return value


def _normalise(x: Tensor, dtype: torch.dtype) -> Tensor:
    """L2-normalise the last dim, computing the norm in at least float32; return ``dtype``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.normalize(x.to(acc), dim=-1, eps=1e-12).to(dtype)


class NeighbourSearch(ABC):
    """1-nearest-neighbour by cosine similarity between token sets."""

    name: str
    exact: bool

    @abstractmethod
    def search(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, Q, C), keys (B, K, C), any float dtype/device, NOT normalised.

        Returns (index (B, Q) int64, similarity (B, Q) float32), both on queries.device;
        index[b, q] = argmax_k cos(queries[b, q], keys[b, k]). 2-D inputs (Q, C) / (K, C) give
        (Q,) results.
        """

    def __call__(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        return self.search(queries, keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, exact={self.exact})"

    @staticmethod
    def _batched(queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Validate shapes; return 3-D (queries, keys on queries.device, was_2d)."""
        if queries.dim() != keys.dim() or queries.dim() not in (2, 3):
            raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must "
                             "both be (B, N, C) or both (N, C)")
        two_d = queries.dim() == 2
        if two_d:
            queries, keys = queries.unsqueeze(0), keys.unsqueeze(0)
        if queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
            raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} differ "
                             "in batch size or channels")
        if keys.shape[1] == 0:
            raise ValueError("keys are empty: need at least one key token per batch element")
        return queries, keys.to(queries.device), two_d


class TorchNeighbourSearch(NeighbourSearch):
    """Exact search by blocked matmul: the reference oracle.

    No similarity block holds more than ``max_block_elements`` entries: queries are processed in
    row blocks and, when ``K`` alone exceeds the budget, keys in column chunks with a running
    max/argmax. Ties: the lowest key index wins (``torch.max`` returns the first maximum and the
    chunk merge keeps the earlier chunk unless a later one is strictly greater).

    Precision: on CPU, fp16/bf16 inputs are computed in float32; on CUDA the matmul stays in the
    input dtype (normalisation is done in float32), so fp16 similarities are ~1e-3 accurate.
    ``on_block(rows, cols)`` is called with every similarity block's shape (for tests/profiling).
    """

    name = "torch"
    exact = True

    def __init__(self, max_block_elements: int = 2**24,
                 on_block: Callable[[int, int], None] | None = None) -> None:
        self.max_block_elements = _positive("max_block_elements", max_block_elements)
        self.on_block = on_block

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if not x.is_floating_point():
            return torch.float32
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return x.dtype

    def search(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        q3, k3, two_d = self._batched(queries, keys)
        dtype = self._compute_dtype(q3)
        B, Q, _ = q3.shape
        K = k3.shape[1]
        cols = min(K, self.max_block_elements)
        rows = max(1, self.max_block_elements // cols)
        index = torch.empty(B, Q, dtype=torch.int64, device=q3.device)
        sim = torch.empty(B, Q, dtype=torch.float32, device=q3.device)
        for b in range(B):
            kn, qb = _normalise(k3[b], dtype), _normalise(q3[b], dtype)
            for r0 in range(0, Q, rows):
                qn = qb[r0:r0 + rows]
                best_v, best_i = None, None
                for c0 in range(0, K, cols):
                    block = torch.matmul(qn, kn[c0:c0 + cols].T)
                    if self.on_block is not None:
                        self.on_block(block.shape[0], block.shape[1])
                    v, i = block.max(dim=1)
                    v, i = v.float(), i + c0
                    if best_v is None:
                        best_v, best_i = v, i
                    else:
                        better = v > best_v
                        best_v = torch.where(better, v, best_v)
                        best_i = torch.where(better, i, best_i)
                    del block
                if best_v is not None:
                    sim[b, r0:r0 + rows], index[b, r0:r0 + rows] = best_v, best_i
        return (index[0], sim[0]) if two_d else (index, sim)


class FaissNeighbourSearch(NeighbourSearch):
    """faiss inner-product search on L2-normalised vectors.

    ``index="flat"`` is exact: faiss's brute-force kNN called on the torch tensors through its torch
    interop (``knn_gpu`` on device memory, fp16/bf16 kept, on the GPU; ``knn`` on float32 CPU tensors), no
    index built, no host copy. ``"ivf"`` (``IndexIVFFlat``, trained on each call's keys, ``nlist`` clipped
    to the number of keys, ``nprobe`` lists probed) and ``"hnsw"`` (``IndexHNSWFlat``, ``hnsw_m`` links,
    ``ef_search`` beam; CPU only) are approximate: one index per batch element over host copies, queries
    in blocks of at most ``max_block_elements // max(K, C)`` rows. ``use_gpu=None`` uses the GPU iff the
    faiss GPU build sees a GPU and the queries are on CUDA; one ``StandardGpuResources`` per object.
    """

    name = "faiss"

    def __init__(self, index: str = "flat", use_gpu: bool | None = None, nlist: int = 64,
                 nprobe: int = 8, hnsw_m: int = 32, ef_search: int = 64,
                 max_block_elements: int = 2**24) -> None:
        self._faiss = _import_faiss()
        if index not in FAISS_INDEXES:
            raise ConfigError(f"faiss index={index!r} is unknown — use one of "
                              f"{', '.join(FAISS_INDEXES)}")
        self.index = index
        self.exact = index == "flat"
        self.name = f"faiss-{index}"
        self.nlist = _positive("nlist", nlist)
        self.nprobe = _positive("nprobe", nprobe)
        self.hnsw_m = _positive("hnsw_m", hnsw_m)
        self.ef_search = _positive("ef_search", ef_search)
        self.max_block_elements = _positive("max_block_elements", max_block_elements)
        if use_gpu and not self.gpu_supported():
            raise ConfigError("use_gpu=True but this faiss build sees no GPU — install "
                              "'tokenflow-video[gpu]' (faiss-gpu) on a CUDA machine, or use "
                              "use_gpu=None")
        self.use_gpu = use_gpu
        self._gpu_res: Any = None

    def gpu_supported(self) -> bool:
        """Whether the installed faiss is a GPU build that sees at least one GPU."""
        faiss = self._faiss
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0

    def _gpu_device(self, queries: Tensor) -> int | None:
        """faiss GPU device id to use for these queries, or None for CPU."""
        if self.use_gpu is False or self.index == "hnsw":  # faiss has no GPU HNSW
            return None
        if self.use_gpu is None and not (queries.is_cuda and self.gpu_supported()):
            return None
        if self._gpu_res is None:
            self._gpu_res = self._faiss.StandardGpuResources()
        return queries.device.index if queries.is_cuda and queries.device.index is not None else 0

    def _build(self, keys: Any, device: int | None) -> Any:
        """Build and fill an inner-product index over ``keys`` ((K, C) float32 numpy)."""
        faiss = self._faiss
        n, d = keys.shape
        if self.index == "flat":
            if device is not None:
                cfg = faiss.GpuIndexFlatConfig()
                cfg.device = device
                idx = faiss.GpuIndexFlatIP(self._gpu_res, d, cfg)
            else:
                idx = faiss.IndexFlatIP(d)
        elif self.index == "ivf":
            nlist = min(self.nlist, n)
            quantizer = faiss.IndexFlatIP(d)  # faiss's wrapper keeps it alive with idx
            idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            idx.cp.min_points_per_centroid = 1  # few keys per list is expected; don't warn
            if device is not None:
                idx = faiss.index_cpu_to_gpu(self._gpu_res, device, idx)
            idx.train(keys)
            idx.nprobe = min(self.nprobe, nlist)
        else:
            idx = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efSearch = self.ef_search
        idx.add(keys)
        return idx

    def search(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        q3, k3, two_d = self._batched(queries, keys)
        if self.index == "flat":
            index, sim = self._flat(q3, k3)
        else:
            index, sim = self._indexed(q3, k3)
        return (index[0], sim[0]) if two_d else (index, sim)

    def _flat(self, q3: Tensor, k3: Tensor) -> tuple[Tensor, Tensor]:
        """Exact search with faiss's brute-force kNN on the tensors themselves (its torch interop): on the GPU
        ``knn_gpu`` reads device memory (fp16/bf16 as is), on the CPU ``knn`` reads the float32 tensors; no index
        is built and nothing is copied to the host."""
        faiss = self._torch_faiss()
        device = self._gpu_device(q3)
        B, Q, _ = q3.shape
        index = torch.empty(B, Q, dtype=torch.int64, device=q3.device)
        sim = torch.empty(B, Q, dtype=torch.float32, device=q3.device)
        on_gpu = device is not None and q3.is_cuda
        dtype = q3.dtype if on_gpu and q3.dtype in (torch.float16, torch.bfloat16) else torch.float32
        for b in range(B):
            kn = _normalise(k3[b], dtype).contiguous()
            qn = _normalise(q3[b], dtype).contiguous()
            if on_gpu:
                d, i = faiss.knn_gpu(self._gpu_res, qn, kn, 1, metric=faiss.METRIC_INNER_PRODUCT, device=device)
            else:
                d, i = faiss.knn(qn.cpu(), kn.cpu(), 1, metric=faiss.METRIC_INNER_PRODUCT)
            index[b], sim[b] = i[:, 0].to(q3.device), d[:, 0].to(q3.device)
        return index, sim

    def _torch_faiss(self) -> Any:
        """faiss with its torch interop installed (``faiss.contrib.torch_utils`` accepts torch tensors)."""
        import faiss.contrib.torch_utils  # noqa: F401  (patches faiss to take torch tensors; idempotent)

        return self._faiss

    def _indexed(self, q3: Tensor, k3: Tensor) -> tuple[Tensor, Tensor]:
        """Approximate search (IVF/HNSW): an index per batch element over host copies of the keys."""
        B, Q, C = q3.shape
        K = k3.shape[1]
        device = self._gpu_device(q3)
        rows = max(1, self.max_block_elements // max(K, C))
        index = torch.empty(B, Q, dtype=torch.int64)
        sim = torch.empty(B, Q, dtype=torch.float32)
        for b in range(B):
            kn = _normalise(k3[b], torch.float32).cpu().contiguous().numpy()
            idx = self._build(kn, device)
            for r0 in range(0, Q, rows):
                qn = _normalise(q3[b, r0:r0 + rows], torch.float32).cpu().contiguous().numpy()
                d, i = idx.search(qn, 1)
                i, d = torch.from_numpy(i[:, 0]), torch.from_numpy(d[:, 0])
                missing = i < 0  # an IVF probe can hit only empty lists: fall back to exact
                if bool(missing.any()):
                    full = torch.from_numpy(qn)[missing] @ torch.from_numpy(kn).T
                    d[missing], i[missing] = full.max(dim=1)
                index[b, r0:r0 + rows], sim[b, r0:r0 + rows] = i, d
        return index.to(q3.device), sim.to(q3.device)


class AutoNeighbourSearch(NeighbourSearch):
    """Exact search by whichever exact backend is faster here: torch (blocked matmul) or faiss flat.

    The first call for each (device, query count, key count, width) times both backends on that call's own
    data and keeps the faster for later calls of that shape (a handful of shapes per run: one per UNet
    resolution). Without faiss, or with a CPU-only faiss and CUDA tensors, torch is used. ``choices`` records
    what was picked, with both timings, for logs and benchmarks.
    """

    name = "auto"
    exact = True

    def __init__(self, max_block_elements: int = 2**24, use_gpu: bool | None = None) -> None:
        self.torch = TorchNeighbourSearch(max_block_elements=max_block_elements)
        self.faiss = (FaissNeighbourSearch("flat", use_gpu=use_gpu,
                                           max_block_elements=max_block_elements)
                      if faiss_available() else None)
        self.choices: dict[tuple, tuple[str, float, float]] = {}  # shape key -> (backend, torch s, faiss s)

    def candidates(self, queries: Tensor) -> list[NeighbourSearch]:
        """The exact backends usable for these queries."""
        if self.faiss is None or (queries.is_cuda and not self.faiss.gpu_supported()):
            return [self.torch]
        return [self.torch, self.faiss]

    def backend_for(self, queries: Tensor, keys: Tensor | None = None) -> NeighbourSearch:
        """The backend :meth:`search` uses (after the first call of this shape: the measured winner)."""
        options = self.candidates(queries)
        if len(options) == 1:
            return options[0]
        picked = self.choices.get(self._key(queries, keys))
        if picked is None:
            return self.faiss  # type: ignore[return-value]  (before measuring: faiss flat, the exact index)
        return self.torch if picked[0] == "torch" else self.faiss  # type: ignore[return-value]

    @staticmethod
    def _key(queries: Tensor, keys: Tensor | None) -> tuple:
        return (queries.device.type, queries.shape[-2], None if keys is None else keys.shape[-2], queries.shape[-1])

    def search(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        options = self.candidates(queries)
        key = self._key(queries, keys)
        if len(options) == 1 or key in self.choices:
            return self.backend_for(queries, keys).search(queries, keys)
        timings, results = [], []
        for backend in options:
            _sync(queries)
            start = time.perf_counter()
            results.append(backend.search(queries, keys))
            _sync(queries)
            timings.append(time.perf_counter() - start)
        winner = 0 if timings[0] <= timings[1] else 1
        self.choices[key] = (options[winner].name if winner == 0 else "faiss", timings[0], timings[1])
        return results[winner]


def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


SEARCHES: dict[str, type[NeighbourSearch]] = {"auto": AutoNeighbourSearch, "faiss": FaissNeighbourSearch,
                                              "torch": TorchNeighbourSearch}  # name -> class (each its ``name``)


def make_search(backend: str = "auto", **kw: Any) -> NeighbourSearch:
    """A search backend by its name (:data:`SEARCHES`: ``"auto"``, ``"faiss"``, ``"torch"``); ``kw`` go to its
    constructor (``"auto"`` takes ``max_block_elements``/``use_gpu``). Configs name the class itself
    (conf/search/*.yaml)."""
    if backend not in SEARCHES:
        raise ConfigError(f"search backend {backend!r} is unknown — use one of {', '.join(SEARCHES)}")
    return SEARCHES[backend](**kw)


def recall_at_1(approx_index: Tensor, exact_index: Tensor) -> float:
    """Fraction of queries whose approximate neighbour equals the exact one (any shape; exact
    ties count as misses). Empty inputs give 1.0."""
    if approx_index.shape != exact_index.shape:
        raise ValueError(f"index shapes differ: {tuple(approx_index.shape)} vs "
                         f"{tuple(exact_index.shape)}")
    if approx_index.numel() == 0:
        return 1.0
    return (approx_index.to(exact_index.device) == exact_index).float().mean().item()
