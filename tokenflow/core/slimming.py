"""AdaFlow's adaptive attention slimming (Zhang et al., ICML 2025): a bounded keyframe context for many keyframes.

With K keyframes of S tokens each, extended attention lets every keyframe read all K·S keyframe tokens: its
cost and its scores grow as K². Above ``max_kv_frames`` keyframes AdaFlow keeps, for each keyframe j, only the
``budget`` ≈ ``max_kv_frames``·S tokens of the pooled K·S most similar to it,

    score_j(i, s) = max_{s'} cos(f_{i,s}, f_{j,s'}),

the best match of pool token (i, s) among keyframe j's own tokens; its own tokens score 1 and are always kept.
The budget is AdaFlow's count, ``int(K·S // (K / max_kv_frames))``. At or below ``max_kv_frames`` keyframes
nothing is dropped: the attention is the paper's, unchanged.

AdaFlow scores once per step and resolution with DIFT features of the clean frames; by default each layer
scores with the features TokenFlow's correspondences use, the source branch's input tokens at that layer and
step (no second model), so the selection follows the keyframes drawn at the step. ``attention.slimming=
reference`` is AdaFlow's own: the video features the adaptive keyframes were cut on (DIFT in
``experiment=reference_adaflow``) resized to each resolution, scored once per step and resolution, and the
budget taken as the plain top-k of the pooled tokens (:func:`reference_selection`; a keyframe's own tokens
score 1 and come first except on exact ties).
"""
from __future__ import annotations

import torch
from torch import Tensor


def slim_budget(n_keyframes: int, tokens: int, max_kv_frames: int | None) -> int | None:
    """Tokens each keyframe attends to under slimming, or None for full attention (``n_keyframes`` at most
    ``max_kv_frames``, or slimming off). AdaFlow's count: ``int(K·S // (K / max_kv_frames))``."""
    if max_kv_frames is None or n_keyframes <= max_kv_frames:
        return None
    return int((n_keyframes * tokens) // (n_keyframes / max_kv_frames))


def slim_scores(features: Tensor, row_chunk: int = 1 << 24) -> Tensor:
    """(K, K·S) float32: row j holds, for each pool token (i, s) of ``features`` (K, S, C), its best cosine
    similarity to keyframe j's tokens. Computed in blocks of about ``row_chunk`` similarities (no K·S x K·S
    matrix is held)."""
    k, s, _ = features.shape
    pool = torch.nn.functional.normalize(features.reshape(k * s, -1).float(), dim=-1)
    rows = max(1, row_chunk // s)
    out = torch.empty(k, k * s, dtype=torch.float32, device=features.device)
    for j in range(k):
        own = pool[j * s:(j + 1) * s].T  # (C, S)
        out[j] = torch.cat([(pool[r:r + rows] @ own).amax(dim=1) for r in range(0, k * s, rows)])
    return out


def slim_selection(features: Tensor, budget: int) -> Tensor:
    """(K, budget) indices into the pooled K·S keyframe tokens: for each keyframe its own S tokens, then the
    ``budget - S`` other tokens that score highest (:func:`slim_scores`); sorted ascending (key order does not
    change attention, sorted indices read the pool in order)."""
    k, s, _ = features.shape
    if not s <= budget <= k * s:
        raise ValueError(f"a slimmed context of {budget} tokens must hold a keyframe's own {s} and at most all {k * s}")
    scores = slim_scores(features)
    own = torch.arange(s, device=scores.device)
    for j in range(k):
        scores[j, j * s + own] = float("inf")  # own tokens first, whatever the ties
    return torch.topk(scores, budget, dim=1).indices.sort(dim=1).values


def reference_selection(features: Tensor, budget: int) -> Tensor:
    """AdaFlow's selection (``key_matching``): (K, budget) indices, the plain top-``budget`` pooled tokens by
    :func:`slim_scores` for each keyframe of ``features`` (K, S, C), sorted ascending."""
    k, s, _ = features.shape
    if not 0 < budget <= k * s:
        raise ValueError(f"a slimmed context of {budget} tokens must hold between 1 and all {k * s}")
    return torch.topk(slim_scores(features), budget, dim=1).indices.sort(dim=1).values


def gather_tokens(pool: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (n,) of the pooled tokens of ``pool`` (K, S, ...) → (n, ...)."""
    return pool.reshape(-1, *pool.shape[2:])[index]
