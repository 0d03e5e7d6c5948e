"""Nearest-neighbour search backends (tokenflow.core.search): exactness, memory bound, recall, errors."""

from __future__ import annotations

import sys
import time

import pytest
import torch
import torch.nn.functional as F

from tokenflow.errors import ConfigError
from tokenflow.core.search import (
    AutoNeighbourSearch,
    FaissNeighbourSearch,
    TorchNeighbourSearch,
    faiss_available,
    make_search,
    recall_at_1,
)

needs_faiss = pytest.mark.skipif(
    not faiss_available(), reason="faiss not installed (pip install 'tokenflow-video[cpu]')")


def brute_force(queries: torch.Tensor, keys: torch.Tensor):
    """Dense float64 cosine matmul + argmax; also the gap between the best and second best."""
    sim = F.normalize(queries.double(), dim=-1)
    sim = sim @ F.normalize(keys.double(), dim=-1).transpose(-1, -2)
    top = sim.topk(min(2, sim.shape[-1]), dim=-1)
    gap = top.values[..., 0] - top.values[..., -1] if sim.shape[-1] > 1 else top.values[..., 0] + 1
    return top.indices[..., 0], top.values[..., 0], gap


def assert_matches(index, sim, queries, keys, gap_tol=1e-5, sim_tol=1e-5):
    ref_i, ref_v, gap = brute_force(queries, keys)
    assert index.shape == ref_i.shape and index.dtype == torch.int64
    assert sim.shape == ref_v.shape and sim.dtype == torch.float32
    clear = gap > gap_tol  # ties (or near-ties) may legitimately resolve either way
    assert clear.float().mean() > 0.5
    assert torch.equal(index[clear], ref_i[clear])
    torch.testing.assert_close(sim.double(), ref_v, atol=sim_tol, rtol=0)


def clustered(gen, batch, n, centers, sigma):
    """Tokens drawn around random cluster centres: (batch, n, C)."""
    pick = torch.randint(len(centers), (batch, n), generator=gen)
    return centers[pick] + sigma * torch.randn(batch, n, centers.shape[1], generator=gen)


@pytest.mark.parametrize("batch,q,k,c,budget", [
    (1, 50, 40, 16, 2**24),   # one block
    (3, 37, 29, 8, 100),      # several row blocks, batch > 1
    (2, 20, 64, 12, 10),      # budget smaller than one row of keys: key chunks + running max
    (1, 7, 5, 4, 1),          # one element per block
])
def test_torch_matches_brute_force(batch, q, k, c, budget):
    gen = torch.Generator().manual_seed(q * k + c)
    queries, keys = torch.randn(batch, q, c, generator=gen), torch.randn(batch, k, c, generator=gen)
    index, sim = TorchNeighbourSearch(max_block_elements=budget).search(queries, keys)
    assert_matches(index, sim, queries, keys)


def test_torch_fp16_and_2d_inputs():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(100, 32, generator=gen).half()
    keys = torch.randn(80, 32, generator=gen).half()
    index, sim = TorchNeighbourSearch(max_block_elements=500).search(queries, keys)
    assert index.shape == (100,) and sim.dtype == torch.float32
    assert_matches(index, sim, queries, keys)  # CPU fp16 is computed in float32


def test_torch_ties_lowest_index_across_chunks():
    eye = torch.eye(4)
    keys = torch.stack([eye[1], eye[0], eye[0], eye[2], eye[0]])  # e0 at 1, 2 and 4
    for budget in (1, 2, 3, 100):
        index, sim = TorchNeighbourSearch(max_block_elements=budget).search(eye[:1], keys)
        assert index.tolist() == [1] and sim.tolist() == [1.0]


def test_torch_block_size_bounded(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(2, 60, 16, generator=gen), torch.randn(2, 50, 16, generator=gen)
    for budget in (20, 200, 4096):
        seen: list[tuple[int, int]] = []
        products: list[int] = []
        real_matmul = torch.matmul

        def recording_matmul(a, b, *args, **kwargs):
            out = real_matmul(a, b, *args, **kwargs)
            products.append(out.numel())
            return out

        monkeypatch.setattr(torch, "matmul", recording_matmul)
        search = TorchNeighbourSearch(budget, on_block=lambda r, c: seen.append((r, c)))
        index, _ = search.search(queries, keys)
        monkeypatch.undo()
        assert products and max(products) <= budget
        assert max(r * c for r, c in seen) <= budget
        # every (query, key) pair is covered exactly once per batch element
        assert sum(r * c for r, c in seen) == 2 * 60 * 50
        assert torch.equal(index, TorchNeighbourSearch().search(queries, keys)[0])


def test_empty_queries_and_shape_errors():
    index, sim = TorchNeighbourSearch().search(torch.empty(2, 0, 8), torch.randn(2, 5, 8))
    assert index.shape == (2, 0) and sim.shape == (2, 0)
    with pytest.raises(ValueError):
        TorchNeighbourSearch().search(torch.randn(2, 4, 8), torch.randn(3, 5, 8))
    with pytest.raises(ValueError):
        TorchNeighbourSearch().search(torch.randn(4, 8), torch.randn(5, 7))
    with pytest.raises(ValueError):
        TorchNeighbourSearch().search(torch.randn(4, 8), torch.empty(0, 8))


@needs_faiss
@pytest.mark.parametrize("two_d", [False, True])
def test_faiss_flat_equals_torch(two_d):
    gen = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(2, 300, 48, generator=gen), torch.randn(2, 500, 48, generator=gen)
    if two_d:
        queries, keys = queries[0], keys[0]
    flat = FaissNeighbourSearch("flat", max_block_elements=5000)  # several query blocks
    assert flat.exact and flat.name == "faiss-flat"
    index, sim = flat.search(queries, keys)
    t_index, t_sim = TorchNeighbourSearch().search(queries, keys)
    assert index.shape == t_index.shape and index.dtype == torch.int64
    assert_matches(index, sim, queries, keys)
    torch.testing.assert_close(sim, t_sim, atol=1e-5, rtol=0)


@needs_faiss
@pytest.mark.parametrize("backend,kw,bound", [
    ("torch", {}, 1.0),
    ("faiss", {"index": "flat"}, 1.0),
    ("faiss", {"index": "ivf"}, 0.99),
    ("faiss", {"index": "hnsw"}, 0.99),
])
def test_planted_neighbours_recovered(backend, kw, bound):
    gen = torch.Generator().manual_seed(3)
    centers = torch.randn(32, 32, generator=gen)
    keys = clustered(gen, 2, 800, centers, 0.3)
    perm = torch.stack([torch.randperm(800, generator=gen)[:400] for _ in range(2)])
    queries = torch.gather(keys, 1, perm[..., None].expand(-1, -1, 32))
    queries = queries + 1e-3 * torch.randn(queries.shape, generator=gen)
    index, sim = make_search(backend, **kw).search(queries, keys)
    assert recall_at_1(index, perm) >= bound
    assert sim.min() > 0.99


@needs_faiss
def test_approximate_recall_on_clustered_data():
    # 256 clusters in 64-d, sigma=1: neighbours are within-cluster but not near-duplicates.
    # Measured (faiss-cpu 1.15.1, 2 threads, seeds 0-4): ivf(nlist=64, nprobe=8) 0.850-0.878,
    # hnsw(M=32, ef=64) 1.000, hnsw(M=4, ef=4) 0.490-0.558. Bounds leave margin for the
    # multithreaded HNSW build order.
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(256, 64, generator=gen)
    keys, queries = clustered(gen, 2, 1000, centers, 1.0), clustered(gen, 2, 300, centers, 1.0)
    exact, _ = TorchNeighbourSearch().search(queries, keys)
    ivf, hnsw = FaissNeighbourSearch("ivf"), FaissNeighbourSearch("hnsw")
    assert not ivf.exact and not hnsw.exact
    assert recall_at_1(ivf.search(queries, keys)[0], exact) >= 0.75
    hnsw_recall = recall_at_1(hnsw.search(queries, keys)[0], exact)
    assert hnsw_recall >= 0.95
    tiny, _ = FaissNeighbourSearch("hnsw", hnsw_m=4, ef_search=4).search(queries, keys)
    assert 0.35 <= recall_at_1(tiny, exact) < hnsw_recall
    # probing every list makes IVF exact
    full, _ = FaissNeighbourSearch("ivf", nlist=16, nprobe=16).search(queries, keys)
    assert recall_at_1(full, exact) >= 0.999


@needs_faiss
def test_ivf_with_fewer_keys_than_lists():
    gen = torch.Generator().manual_seed(4)
    queries, keys = torch.randn(20, 8, generator=gen), torch.randn(10, 8, generator=gen)
    index, sim = FaissNeighbourSearch("ivf", nlist=64, nprobe=64).search(queries, keys)
    assert_matches(index, sim, queries, keys)


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="bogus.*auto, faiss, torch"):
        make_search("bogus")
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="max_block_elements"):
            TorchNeighbourSearch(max_block_elements=bad)


@needs_faiss
def test_bad_faiss_settings_raise_config_error():
    with pytest.raises(ConfigError, match="lsh.*flat, ivf, hnsw"):
        FaissNeighbourSearch(index="lsh")
    for name in ("nlist", "nprobe", "hnsw_m", "ef_search", "max_block_elements"):
        with pytest.raises(ConfigError, match=name):
            FaissNeighbourSearch(**{name: 0})
    if not FaissNeighbourSearch().gpu_supported():
        with pytest.raises(ConfigError, match="use_gpu"):
            FaissNeighbourSearch(use_gpu=True)


def test_missing_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ConfigError, match=r"faiss is not installed.*search=torch"):
        make_search("faiss")
    auto = make_search("auto")
    assert isinstance(auto, AutoNeighbourSearch) and auto.faiss is None
    queries, keys = torch.randn(2, 10, 8), torch.randn(2, 12, 8)
    assert auto.backend_for(queries) is auto.torch
    expected, _ = TorchNeighbourSearch().search(queries, keys)
    assert torch.equal(auto.search(queries, keys)[0], expected)


@needs_faiss
def test_auto_measures_once_per_shape_and_keeps_the_faster(monkeypatch):
    auto = make_search("auto", max_block_elements=1000)
    assert auto.exact and auto.faiss.index == "flat"
    assert auto.backend_for(torch.zeros(1, 4)) is auto.faiss  # before any measurement
    gen = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(2, 50, 16, generator=gen), torch.randn(2, 60, 16, generator=gen)
    calls = {"torch": 0, "faiss": 0}
    for backend, name in ((auto.torch, "torch"), (auto.faiss, "faiss")):
        original = backend.search

        def counted(q, k, original=original, name=name):
            calls[name] += 1
            if name == "torch":
                time.sleep(0.05)  # make torch the slow one: auto must keep faiss
            return original(q, k)
        monkeypatch.setattr(backend, "search", counted)
    for _ in range(3):
        index, sim = auto.search(queries, keys)
        assert_matches(index, sim, queries, keys)
    assert calls == {"torch": 1, "faiss": 3}  # both timed on the first call only
    (picked, t_torch, t_faiss), = auto.choices.values()
    assert picked == "faiss" and t_torch > t_faiss
    auto.search(torch.randn(2, 7, 16), torch.randn(2, 60, 16))  # a new shape is measured again
    assert len(auto.choices) == 2 and calls["torch"] == 2


@needs_faiss
def test_faiss_flat_builds_no_index_and_hands_faiss_the_tensors(monkeypatch):
    """Exact faiss search calls faiss.knn on torch tensors (its torch interop: on CUDA with faiss-gpu, knn_gpu on
    the device tensors), once per batch element with the normalised rows: no index is built (building one fails
    here) and no numpy copy is made (Tensor.numpy fails here)."""
    import faiss

    search = FaissNeighbourSearch("flat")
    search._torch_faiss()  # install faiss's torch interop, as the first search does
    seen = []
    interop_knn = faiss.knn

    def spy(xq, xb, k, *args, **kwargs):
        seen.append((xq, xb))
        return interop_knn(xq, xb, k, *args, **kwargs)

    def no_index(*args, **kwargs):
        raise AssertionError("flat search must not build an index")

    def no_numpy(self, *args, **kwargs):
        raise AssertionError("flat search must not copy the tokens into numpy arrays")

    monkeypatch.setattr(faiss, "IndexFlatIP", no_index)
    monkeypatch.setattr(faiss, "knn", spy)
    gen = torch.Generator().manual_seed(4)
    queries, keys = torch.randn(3, 40, 32, generator=gen), torch.randn(3, 50, 32, generator=gen)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "numpy", no_numpy)
        index, sim = search.search(queries, keys)
    assert_matches(index, sim, queries, keys)
    assert len(seen) == 3
    for b, (xq, xb) in enumerate(seen):
        assert isinstance(xq, torch.Tensor) and isinstance(xb, torch.Tensor)
        assert xq.is_contiguous() and xq.dtype == torch.float32 and xq.device == queries.device
        assert torch.allclose(xq, torch.nn.functional.normalize(queries[b], dim=-1), atol=1e-6)
        assert torch.allclose(xb, torch.nn.functional.normalize(keys[b], dim=-1), atol=1e-6)


def test_recall_at_1():
    assert recall_at_1(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    assert recall_at_1(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)) == 1.0
    with pytest.raises(ValueError):
        recall_at_1(torch.zeros(3), torch.zeros(4))


@pytest.mark.gpu
@needs_faiss
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_faiss_gpu_flat_matches_torch_on_cuda(dtype):
    flat = FaissNeighbourSearch("flat")
    if not flat.gpu_supported():
        pytest.skip("faiss build without GPU support (pip install 'tokenflow-video[gpu]')")
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(2, 300, 64, generator=gen).cuda().to(dtype)
    keys = torch.randn(2, 400, 64, generator=gen).cuda().to(dtype)
    index, sim = flat.search(queries, keys)  # knn_gpu on the device tensors, fp16 kept
    assert index.is_cuda and sim.is_cuda and flat._gpu_res is not None
    t_index, t_sim = TorchNeighbourSearch().search(queries.float(), keys.float())
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(sim, t_sim, atol=atol, rtol=0)
    assert recall_at_1(index, t_index) > (0.999 if dtype == torch.float32 else 0.97)



@pytest.fixture(scope="module")
def clip_tokens(tiny, clip8):
    """layer -> source self-attention input tokens (8, S, C) of the 8-frame clip at the first of 2 DDIM steps."""
    from tokenflow.evaluation.correspondence import source_tokens
    from tokenflow.core.inversion import DDIMInverter
    from tokenflow.core.video_inversion import invert_video

    inversion = invert_video(tiny, clip8, DDIMInverter(n_steps=2, keep_steps=2), "a wolf", progress=False)[0]
    return {layer: source_tokens(tiny, inversion, layer, inversion.timesteps[0]).float() for layer in (0, 6, 13)}


@needs_faiss
@pytest.mark.parametrize("layer", [0, 6, 13])  # 16x16, 2x2 (mid block) and 16x16 decoder tokens
def test_faiss_matches_torch_on_real_tiny_model_tokens(clip_tokens, layer):
    """The propagation's shapes on real diffusion features: all frames' tokens vs each keyframe's."""
    tokens = clip_tokens[layer]                                                       # (8, S, C)
    keys = tokens[[1, 5]]                                                             # (2, S, C)
    queries = tokens.reshape(1, -1, tokens.shape[-1]).expand(2, -1, -1)              # (2, 8*S, C)
    t_index, t_sim = TorchNeighbourSearch(max_block_elements=4096).search(queries, keys)
    f_index, f_sim = FaissNeighbourSearch("flat", max_block_elements=4096).search(queries, keys)
    assert_matches(t_index, t_sim, queries, keys)
    assert_matches(f_index, f_sim, queries, keys)
    torch.testing.assert_close(f_sim, t_sim, atol=1e-5, rtol=0)
    own = t_index.view(2, 8, -1)[[0, 1], [1, 5]]  # a keyframe's tokens match themselves
    assert torch.equal(own, torch.arange(keys.shape[1]).expand(2, -1))
    hnsw, _ = FaissNeighbourSearch("hnsw").search(queries, keys)
    assert recall_at_1(hnsw, t_index) > 0.9
