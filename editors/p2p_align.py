"""Token bookkeeping for Prompt-to-Prompt: token ids, word positions, source↔target token mappers.

Positions index the padded text-encoder sequence (``tokenizer.model_max_length``, 77 for CLIP):
position 0 is the start token, then the prompt's tokens, then the end token and padding.
A mapper gives, for every target position j, the source position whose cross-attention map the
target takes (``-1``: a new word with no source counterpart).
"""
from __future__ import annotations

import torch
from torch import Tensor

from tokenflow.errors import ConfigError


def token_ids(tokenizer, prompt: str) -> list[int]:
    """Ids of ``prompt`` with start/end tokens, no padding (truncated to the encoder's length)."""
    return list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def word_positions(tokenizer, prompt: str, word: str, required: bool = True) -> list[int]:
    """Positions of every occurrence of ``word`` (one or more tokens, e.g. "cat" or "red car") in ``prompt``.

    required: a word that does not occur is a ConfigError (otherwise: an empty list).
    """
    ids = token_ids(tokenizer, prompt)
    target = list(tokenizer(word, add_special_tokens=False).input_ids)
    if not target:
        raise ConfigError(f"word {word!r} has no tokens — use a non-empty word of the prompt")
    n = len(target)
    hits = [i + k for i in range(1, len(ids) - n) if ids[i : i + n] == target for k in range(n)]
    if not hits and required:
        raise ConfigError(f"word {word!r} does not occur in prompt {prompt!r} — use a word of that prompt")
    return hits


def replacement_mapper(tokenizer, source: str, target: str) -> Tensor:
    """Word swap: prompts of equal token count map position to position (identity), (L,) long."""
    n_src, n_tgt = len(token_ids(tokenizer, source)), len(token_ids(tokenizer, target))
    if n_src != n_tgt:
        raise ConfigError(f"mode=replace needs prompts of equal token count, got {n_src - 2} tokens in {source!r} and "
                          f"{n_tgt - 2} in {target!r} — reword one of them or use mode=refine")
    return torch.arange(tokenizer.model_max_length)


def refinement_mapper(tokenizer, source: str, target: str) -> Tensor:
    """Refinement: align tokens by longest common subsequence; new target words map to -1, (L,) long.

    Padding after the target's end token maps to the source's padding in order (clamped to L - 1).
    E.g. "a cat" → "a fluffy cat": [0, 1, -1, 2, 3, 4, 5, ...].
    """
    x, y = token_ids(tokenizer, source), token_ids(tokenizer, target)
    length = tokenizer.model_max_length
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(len(x) - 1, -1, -1):
        for j in range(len(y) - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if x[i] == y[j] else max(table[i + 1][j], table[i][j + 1])
    mapper = [-1] * len(y)
    i = j = 0
    while i < len(x) and j < len(y):
        if x[i] == y[j]:
            mapper[j] = i
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    pad = [min(len(x) + k, length - 1) for k in range(length - len(y))]
    return torch.tensor(mapper + pad, dtype=torch.long)


def equalizer(tokenizer, prompt: str, scales: dict[str, float]) -> Tensor:
    """(L,) scale per target position: ``scales[word]`` at the word's tokens, 1 elsewhere."""
    eq = torch.ones(tokenizer.model_max_length)
    for word, scale in scales.items():
        eq[word_positions(tokenizer, prompt, word)] = float(scale)
    return eq
