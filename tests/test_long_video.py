"""Long videos: the bounded keyframe context (anchors + segments), checked against hand-computed attention and
against the unbounded method where the two must agree."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import UNetCounter, translation_clip
from test_core_oracles import _Plain
from tokenflow import (DDIMInverter, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator,
                       invert_video)
from tokenflow.core.attention import KeyframeAttention, TokenFlowRuntime, TokenFlowSelfAttention
from tokenflow.core.editor import SOURCE, Branch, Step
from tokenflow.editors import PnPEditor
from tokenflow.errors import ConfigError
from tokenflow.models.layout import UNetLayout


def anchored_oracle(attn, q, k, v, anchor_k, anchor_v):
    """Frame f's output (F, S, C_out) when its queries attend to its own keys/values and the anchors' (A, S, C),
    by hand in float64."""
    heads, (n_frames, n_tokens, width) = attn.heads, q.shape
    d = width // heads
    outs = []
    for f in range(n_frames):
        keys = torch.cat([k[f:f + 1], anchor_k]).reshape(-1, heads, d).double()       # ((1+A)S, h, d)
        values = torch.cat([v[f:f + 1], anchor_v]).reshape(-1, heads, d).double()
        query = q[f].reshape(n_tokens, heads, d).double()
        weights = torch.softmax(torch.einsum("shd,thd->hst", query, keys) / math.sqrt(d), dim=-1)
        outs.append(torch.einsum("hst,thd->shd", weights, values).reshape(n_tokens, width))
    out = torch.stack(outs)
    linear = attn.to_out[0]
    return (out @ linear.weight.double().T + linear.bias.double()) / attn.rescale_output_factor


@pytest.mark.parametrize("chunk", [5, 4096])
def test_anchored_attention_equals_softmax_over_own_and_anchor_tokens(tiny, chunk):
    """anchors pass: joint over the anchors, K/V kept; anchored pass: each frame over itself + the anchors (the
    source branch per frame). Catches: anchors' keys from the wrong branch, a frame seeing its chunk-mates,
    a missing own key, chunked queries misaligned."""
    name = UNetLayout.from_unet(tiny.unet).self_attention[0]
    attn = tiny.unet.get_submodule(name)
    width, n_tokens = attn.to_q.in_features, 64
    g = torch.Generator().manual_seed(1)
    emb = torch.zeros(1, 4, 32)
    branches = (Branch(SOURCE, emb, latents="source", joint=False), Branch("cond", emb))
    runtime = TokenFlowRuntime(_Plain(), TokenFlowPropagator(), latent_hw=(8, 8), attention_chunk=chunk)
    processor = TokenFlowSelfAttention(name, runtime)
    anchors_in = torch.randn(2 * 2, n_tokens, width, generator=g)     # 2 branches x 2 anchors
    others_in = torch.randn(2 * 3, n_tokens, width, generator=g)      # 2 branches x 3 keyframes
    with torch.no_grad():
        runtime.step = Step(0, 501, 1, "anchors", torch.tensor([0, 8]), torch.tensor([0, 4, 8]), branches)
        processor(attn, anchors_in)
        runtime.step = Step(0, 501, 1, "anchored", torch.tensor([2, 4, 6]), torch.tensor([0, 4, 8]), branches)
        out = processor(attn, others_in).unflatten(0, (2, 3))
        a = anchors_in.unflatten(0, (2, 2))
        x = others_in.unflatten(0, (2, 3))
        expected = anchored_oracle(attn, attn.to_q(x[1]), attn.to_k(x[1]), attn.to_v(x[1]), attn.to_k(a[1]),
                                   attn.to_v(a[1]))
        source = anchored_oracle(attn, attn.to_q(x[0]), attn.to_k(x[0]), attn.to_v(x[0]), attn.to_k(x[0][:0]),
                                 attn.to_v(x[0][:0]))  # no anchors: per-frame attention
    assert torch.allclose(out[1].double(), expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(out[0].double(), source, atol=1e-5, rtol=1e-4)
    kept = runtime.keyframe_tokens[name]
    assert kept.ids == [0, 2, 4, 6, 8] and torch.equal(kept.outputs[0, [1, 2, 3]], out[1])  # merged by keyframe


@pytest.fixture(scope="module")
def inversion(tiny):
    video = translation_clip(n=12, size=64, shift=8)
    return invert_video(tiny, video, DDIMInverter(n_steps=3, keep_steps=3), "a texture", progress=False)[0]


def _edit(tiny, inversion, attention, keyframes=None):
    pipe = TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), keyframes or RandomKeyframes(2, seed=4),
                             n_steps=3, chunk_size=2, attention=attention)
    with UNetCounter(tiny.unet) as counter:
        result = pipe.edit(inversion, "a red texture", "ugly", progress=False)
    return result.latents, counter.samples


def test_anchors_covering_every_keyframe_are_the_unbounded_method(tiny, inversion):
    """With as many anchors as keyframes and one segment, the bounded path makes the unbounded method's calls."""
    full, full_evals = _edit(tiny, inversion, None)
    same, same_evals = _edit(tiny, inversion, KeyframeAttention("anchors", anchors=6, segment=6))
    assert torch.equal(full, same) and full_evals == same_evals == 3 * 3 * 12


def test_bounded_context_holds_few_keyframes_and_costs_the_same(tiny, inversion, monkeypatch):
    """Two anchors, segments of two keyframes: every frame is stepped once per step (3N UNet evaluations), at most
    segment + anchors + 1 keyframes' tokens are held, and the edit stays close to the unbounded one."""
    held = []
    original = TokenFlowRuntime.keep_keyframes

    def spy(self, ids):
        original(self, ids)
        held.append(max(len(t.ids) for t in self.keyframe_tokens.values()))
    monkeypatch.setattr(TokenFlowRuntime, "keep_keyframes", spy)
    full, _ = _edit(tiny, inversion, None)
    bounded, evals = _edit(tiny, inversion, KeyframeAttention("anchors", anchors=2, segment=2))
    assert evals == 3 * 3 * 12
    assert held and max(held) <= 2 + 1  # the boundary keyframe and the anchors still to come
    relative = float((bounded - full).norm() / full.norm())
    # measured 0.0025 on this clip: each keyframe sees 2 anchors instead of all 6 keyframes
    assert 0 < relative < 0.05, relative


def test_bounded_context_needs_the_paper_blend(tiny):
    with pytest.raises(ConfigError, match="attention.context=anchors needs a propagator"):
        TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(blend="reference"),
                          attention=KeyframeAttention("anchors"))
    with pytest.raises(ConfigError, match="attention.context='nearby' is unknown"):
        KeyframeAttention("nearby")


def test_propagating_only_some_stages(tiny, inversion, monkeypatch):
    """stages=[up]: only the decoder's self-attention layers are propagated (and keep keyframe tokens); down and mid
    layers attend per frame in the propagate pass; the edit is between the full method and per-frame editing."""
    from tokenflow import NoPropagation

    layout = UNetLayout.from_unet(tiny.unet)
    every = set(layout.self_attention)
    up = {name for name in every if layout.stage[name] == "up"}
    assert up and every - up  # the tiny UNet has layers in each stage
    propagated: set[str] = set()
    kept: set[str] = set()
    original_propagate, original_clear = TokenFlowPropagator.propagate, TokenFlowRuntime.clear_step

    def spy_propagate(self, query):
        propagated.add(query.layer)
        return original_propagate(self, query)

    def spy_clear(self):  # at the end of each step: the layers that held keyframe tokens during it
        kept.update(self.keyframe_tokens)
        original_clear(self)
    monkeypatch.setattr(TokenFlowPropagator, "propagate", spy_propagate)
    monkeypatch.setattr(TokenFlowRuntime, "clear_step", spy_clear)

    def edit(propagator):
        propagated.clear(), kept.clear()
        pipe = TokenFlowPipeline(tiny, PnPEditor(), propagator, RandomKeyframes(2, seed=4), n_steps=3, chunk_size=2)
        return pipe.edit(inversion, "a red texture", "ugly", progress=False).latents, set(propagated), set(kept)

    (full, full_layers, full_kept), (up_only, up_layers, up_kept) = edit(TokenFlowPropagator()), \
        edit(TokenFlowPropagator(stages=["up"]))
    per_frame, _, _ = edit(NoPropagation())
    assert full_layers == every and up_layers == up, sorted(up_layers ^ up)
    assert up_kept == up and full_kept == every  # down/mid layers keep no keyframe tokens with stages=[up]
    d_full, d_frame = float((up_only - full).norm()), float((up_only - per_frame).norm())
    assert d_full > 0 and d_frame > 0, (d_full, d_frame)
    with pytest.raises(ConfigError, match="propagator.stages\\[\\]='sideways' is unknown"):
        TokenFlowPropagator(stages=["sideways"])
