"""The preflight's count of stored keyframe tokens is the count a real edit stores, on SD and on SDXL.

SDXL's blocks hold 2 and 10 transformer blocks each (``transformer_layers_per_block``), so counting one
self-attention layer per attention block undercounts its stored tokens five-fold; the estimate reads the
layers from :class:`~tokenflow.models.layout.UNetLayout` instead, and this test counts what the
TokenFlow processors really keep during a tiny edit.
"""
from __future__ import annotations

import pytest
import torch

from tokenflow import RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator, load_model
from tokenflow.core.attention import TokenFlowRuntime
from tokenflow.core.memory import ModelShape
from tokenflow.editors import PnPEditor
from tokenflow.storage.video import Video

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("variant, size", [("sd21-base", 64), ("sdxl", 64)])
def test_stored_keyframe_tokens_equal_the_estimate(variant, size, cache_dir, monkeypatch):
    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant=variant)
    stored: list[tuple[int, int]] = []  # (elements per keyframe and branch, layers) at the end of each step
    real_clear = TokenFlowRuntime.clear_step

    def record(runtime):
        if runtime.keyframe_tokens:
            per = {t.outputs[0, 0].numel() for t in runtime.keyframe_tokens.values()}
            total = sum(t.outputs[0, 0].numel() for t in runtime.keyframe_tokens.values())
            assert len({t.outputs.shape[:2] for t in runtime.keyframe_tokens.values()}) == 1 and per
            stored.append((total, len(runtime.keyframe_tokens)))
        real_clear(runtime)

    monkeypatch.setattr(TokenFlowRuntime, "clear_step", record)
    g = torch.Generator().manual_seed(0)
    video = Video.from_tensor(torch.rand(2, 3, size, size, generator=g) * 2 - 1, fps=10.0, source="random")
    pipe = TokenFlowPipeline(model, PnPEditor(), TokenFlowPropagator(stride=2), RandomKeyframes(2, seed=0), n_steps=2,
                             chunk_size=2)
    pipe(video, "a fox", inversion_prompt="a wolf", progress=False)
    shape = ModelShape.from_model(model)
    latent = size // model.vae_scale_factor
    assert stored, "no keyframe tokens were stored: the test does not test"
    total, layers = stored[0]
    assert layers == len(shape.self_attention_levels) == len(pipe.layout.self_attention)
    assert total == shape.self_attention_tokens(latent, latent)
