"""AdaFlow's adaptive attention slimming (``attention=auto``, the default): the scores and the selection against
brute force, the UNet and MMDiT keyframe passes against a hand-written softmax over the selected tokens, and
the default equal to the paper's full attention wherever the keyframes number at most ``max_kv_frames``."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import UNetCounter, translation_clip
from test_core_oracles import _Plain
from test_joint_attention import BRANCHES, C, L, S, _err, image_out, oracle_qkv, runtime_of, softmax_attend, step_of
from test_long_video import anchored_oracle
from tokenflow import DDIMInverter, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator, invert_video
from tokenflow.core.attention import KeyframeAttention, TokenFlowRuntime, TokenFlowSelfAttention
from tokenflow.core.editor import SOURCE, Branch, Step
from tokenflow.core.joint_attention import TokenFlowJointAttention
from tokenflow.core.slimming import slim_budget, slim_scores, slim_selection
from tokenflow.editors import PnPEditor
from tokenflow.errors import ConfigError
from tokenflow.models.layout import UNetLayout

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def brute_scores(features: torch.Tensor) -> torch.Tensor:
    """(K, K·S): the whole K·S x K·S cosine matrix, then the best match within each keyframe's block, in float64."""
    k, s, _ = features.shape
    pool = torch.nn.functional.normalize(features.reshape(k * s, -1).double(), dim=-1)
    cos = pool @ pool.T                                   # (pool token, keyframe token)
    return cos.reshape(k * s, k, s).amax(dim=2).T         # row j: each pool token's best cosine to keyframe j


def test_budget_is_adaflows_count():
    assert slim_budget(20, 64, 20) is None and slim_budget(5, 64, 20) is None   # at most max_kv_frames: full
    assert slim_budget(40, 64, 20) == 1280          # 40·64 // (40/20): twenty keyframes' worth
    assert slim_budget(30, 64, 20) == 1280          # 1920 // 1.5
    assert slim_budget(25, 16, 2) == 32             # 400 // 12.5
    assert slim_budget(100, 64, None) is None       # slimming off (attention=all)


def test_scores_and_selection_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 10, 8, generator=g)
    scores = slim_scores(features, row_chunk=7)     # uneven blocks
    assert torch.allclose(scores.double(), brute_scores(features), atol=1e-6)
    budget = 23
    chosen = slim_selection(features, budget)
    brute = brute_scores(features)
    for j in range(6):
        own = set(range(j * 10, (j + 1) * 10))
        picked = set(chosen[j].tolist())
        assert own <= picked and len(picked) == budget                      # own tokens always kept, no repeats
        others = brute[j].clone()
        others[list(own)] = -math.inf
        best = set(torch.topk(others, budget - 10).indices.tolist())
        assert picked - own == best                                          # then the highest-scoring others
    with pytest.raises(ValueError, match="own 10"):
        slim_selection(features, 9)


def test_own_tokens_win_over_identical_tokens_of_other_keyframes():
    """A static clip: every keyframe's tokens equal, every score 1 — the keyframe's own tokens must still be kept."""
    features = torch.randn(1, 8, 4).expand(5, -1, -1).contiguous()
    chosen = slim_selection(features, 16)
    for j in range(5):
        assert set(range(j * 8, (j + 1) * 8)) <= set(chosen[j].tolist())


def slim_oracle(q, k, v, selection, heads: int):
    """Frame f of one branch, q, k, v (F, S, C): queries attend to the pooled keys ``selection[f]``, by hand in
    float64 → (F, S, C) before ``to_out``."""
    n, s, c = q.shape
    d = c // heads
    pool_k, pool_v = k.reshape(n * s, heads, d).double(), v.reshape(n * s, heads, d).double()
    outs = []
    for f in range(n):
        keys, values = pool_k[selection[f]], pool_v[selection[f]]
        w = torch.softmax(torch.einsum("shd,thd->hst", q[f].reshape(s, heads, d).double(), keys) / math.sqrt(d), -1)
        outs.append(torch.einsum("hst,thd->shd", w, values).reshape(s, c))
    return torch.stack(outs)


@pytest.mark.parametrize("chunk", [5, 4096])
def test_unet_keyframe_pass_attends_to_the_selected_tokens(tiny, chunk):
    """Five keyframes, max_kv_frames 2: each edit-branch keyframe attends to its own tokens and the others picked
    on the source branch's tokens; the source branch per frame. Catches: scoring on the edit branch, a selection
    from the wrong pool, a keyframe missing its own keys, chunked queries misaligned."""
    name = UNetLayout.from_unet(tiny.unet).self_attention[0]
    attn = tiny.unet.get_submodule(name)
    width, n_tokens, n = attn.to_q.in_features, 16, 5
    g = torch.Generator().manual_seed(2)
    emb = torch.zeros(1, 4, 32)
    branches = (Branch(SOURCE, emb, latents="source", joint=False), Branch("cond", emb))
    runtime = TokenFlowRuntime(_Plain(), TokenFlowPropagator(), latent_hw=(4, 4), attention_chunk=chunk,
                               max_kv_frames=2)
    x = torch.randn(2, n, n_tokens, width, generator=g)
    frames = torch.tensor([0, 4, 8, 12, 16])
    with torch.no_grad():
        runtime.step = Step(0, 501, 1, "keyframes", frames, frames, branches)
        out = TokenFlowSelfAttention(name, runtime)(attn, x.flatten(0, 1)).unflatten(0, (2, n))
        selection = slim_selection(x[0], slim_budget(n, n_tokens, 2))
        raw = slim_oracle(attn.to_q(x[1]), attn.to_k(x[1]), attn.to_v(x[1]), selection, attn.heads)
        linear = attn.to_out[0]
        expected = (raw @ linear.weight.double().T + linear.bias.double()) / attn.rescale_output_factor
        per_frame = anchored_oracle(attn, attn.to_q(x[0]), attn.to_k(x[0]), attn.to_v(x[0]), attn.to_k(x[0][:0]),
                                    attn.to_v(x[0][:0]))
        full = TokenFlowSelfAttention(name, TokenFlowRuntime(_Plain(), TokenFlowPropagator(), latent_hw=(4, 4)))
        runtime.step = None
        full.runtime.step = Step(0, 501, 1, "keyframes", frames, frames, branches)
        unslimmed = full(attn, x.flatten(0, 1)).unflatten(0, (2, n))
    assert selection.shape == (n, 32)  # 80 pooled tokens // 2.5 keyframes
    assert torch.allclose(out[1].double(), expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(out[0].double(), per_frame, atol=1e-5, rtol=1e-4)
    assert (out[1] - unslimmed[1]).abs().max() > 1e-4  # the slimmed context really is smaller
    assert runtime.keyframe_tokens[name].ids == frames.tolist()


def test_mmdit_keyframe_pass_attends_to_the_selected_image_tokens():
    """SD 3.5's joint attention: each keyframe's image queries attend to the selected image tokens of all
    keyframes plus its own text; text queries stay per frame."""
    from test_joint_attention import tiny_sd3

    model = tiny_sd3("sd35")
    attn = model.get_submodule("transformer_blocks.1.attn")
    runtime = runtime_of()
    runtime.max_kv_frames = 2
    torch.manual_seed(5)
    n = 4
    src, edit, txt = torch.randn(n, S, C), torch.randn(n, S, C), torch.randn(2 * n, L, C)
    runtime.step = step_of("keyframes", [0, 4, 8, 12])
    with torch.no_grad():
        img_out, _ = TokenFlowJointAttention("transformer_blocks.1.attn", runtime)(attn, torch.cat([src, edit]), txt)
        selection = slim_selection(src, slim_budget(n, S, 2))
        q, k, v, tq, tk, tv = oracle_qkv(attn, edit, txt[n:])
        want = torch.stack([image_out(attn, softmax_attend(q[f], torch.cat([k.flatten(0, 1)[selection[f]], tk[f]]),
                                                           torch.cat([v.flatten(0, 1)[selection[f]], tv[f]])))
                            for f in range(n)])
    assert selection.shape == (n, 32)
    assert _err(img_out[n:], want) <= 1e-5
    assert BRANCHES[0].name == SOURCE


@pytest.fixture(scope="module")
def inversion(tiny):
    video = translation_clip(n=12, size=64, shift=8)
    return invert_video(tiny, video, DDIMInverter(n_steps=2, keep_steps=2), "a texture", progress=False)[0]


def _edit(tiny, inversion, attention):
    pipe = TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), RandomKeyframes(2, seed=4), n_steps=2,
                             chunk_size=4, attention=attention)
    with UNetCounter(tiny.unet) as counter:
        result = pipe.edit(inversion, "a red texture", "ugly", progress=False)
    return result, counter.samples


def test_default_is_the_papers_attention_up_to_max_kv_frames(tiny, inversion):
    """12 frames at stride 2: 6 keyframes. auto with max_kv_frames >= 6 is the paper's full attention, bit for bit;
    with max_kv_frames 3 it slims (a different edit, the same number of UNet evaluations)."""
    full, full_evals = _edit(tiny, inversion, KeyframeAttention("all"))
    default, default_evals = _edit(tiny, inversion, KeyframeAttention())
    assert KeyframeAttention().context.value == "auto" and KeyframeAttention().max_kv_frames == 20
    assert torch.equal(default.latents, full.latents) and default_evals == full_evals
    edge, _ = _edit(tiny, inversion, KeyframeAttention("auto", max_kv_frames=6))
    assert torch.equal(edge.latents, full.latents)
    slim, slim_evals = _edit(tiny, inversion, KeyframeAttention("auto", max_kv_frames=3))
    assert slim_evals == full_evals and torch.isfinite(slim.latents).all()
    assert (slim.latents - full.latents).abs().max() > 1e-6


def test_bad_max_kv_frames_is_one_clear_line():
    with pytest.raises(ConfigError, match="attention.max_kv_frames=0"):
        KeyframeAttention("auto", max_kv_frames=0)
