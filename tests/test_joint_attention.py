"""TokenFlow's SD3 joint-attention processor against the stock processor and hand-written oracles.

A tiny ``SD3Transformer2DModel`` is built inline (SD3: plain; SD 3.5: qk RMS-norm and a dual-attention block),
float32. Oracles are float64 einsum/softmax over explicitly concatenated tokens (no SDPA).
"""
from __future__ import annotations

import math

import pytest
import torch

from tokenflow.core.attention import TokenFlowRuntime
from tokenflow.core.editor import SOURCE, Branch, KeyframeEditor, Step
from tokenflow.core.joint_attention import (TokenFlowJointAttention, extended_joint_attention, install_joint_attention,
                                            joint_attention_layers, patch_grid)
from tokenflow.core.propagation import Propagator, TokenFlowPropagator
from tokenflow.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: E402

CONFIG = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
              joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
              pos_embed_max_size=16)
VARIANTS = {"sd3": {}, "sd35": dict(qk_norm="rms_norm", dual_attention_layers=(0,))}
S, L, C = 16, 5, 32  # image tokens of an 8x8 latent with 2x2 patches, text tokens, width


def tiny_sd3(variant: str) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIG, **VARIANTS[variant]).eval()
    with torch.no_grad():  # the qk-norm weights start at ones: make them matter
        for name, p in model.named_parameters():
            if ".norm_" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def sd35():
    return tiny_sd3("sd35")


class _Plain(KeyframeEditor):
    def prepare(self, inputs):
        pass

    def branches(self, step):
        return []

    def guide(self, eps, step):
        return eps["edit"]


BRANCHES = (Branch(SOURCE, torch.zeros(1, L, C), latents="source", joint=False), Branch("edit", torch.zeros(1, L, C)))


def step_of(phase: str, frames: list[int], keyframes: list[int] | None = None) -> Step:
    return Step(index=0, timestep=500, n_steps=4, phase=phase, frames=torch.tensor(frames),
                keyframes=torch.tensor(keyframes if keyframes is not None else frames), branches=BRANCHES)


def runtime_of(propagator: Propagator | None = None, editor: KeyframeEditor | None = None) -> TokenFlowRuntime:
    return TokenFlowRuntime(editor=editor or _Plain(), propagator=propagator or TokenFlowPropagator(),
                            latent_hw=(8, 8), attention_chunk=5)  # 5: image queries split in uneven chunks


def stock(attn, img, txt):
    out = JointAttnProcessor2_0()(attn, img, txt)
    return out if txt is not None else (out, None)


# ---- float64 oracle -----------------------------------------------------------------------------------------

def _lin(linear, x):
    return x.double() @ linear.weight.double().T + linear.bias.double()


def _rms(norm, x):
    if norm is None:
        return x
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return y * norm.weight.double()


def oracle_qkv(attn, img, txt):
    """Per-frame (F, T, H, D) float64 q, k, v of image and text (None), normed as SD3 does."""
    h = attn.heads
    split = (lambda t: t.unflatten(-1, (h, t.shape[-1] // h)))
    q, k, v = (split(_lin(p, img)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = _rms(attn.norm_q, q), _rms(attn.norm_k, k)
    if txt is None:
        return q, k, v, None, None, None
    tq, tk, tv = (split(_lin(p, txt)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    return q, k, v, _rms(attn.norm_added_q, tq), _rms(attn.norm_added_k, tk), tv


def softmax_attend(q, k, v):
    """q (S, H, D) on k, v (T, H, D) → (S, H·D), by hand."""
    w = torch.softmax(torch.einsum("shd,thd->hst", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("hst,thd->shd", w, v).flatten(-2)


def image_out(attn, x):
    return _lin(attn.to_out[0], x)


def text_out(attn, x):
    return x if attn.context_pre_only else _lin(attn.to_add_out, x)


def oracle(attn, img, txt, joint: bool, extra=None):
    """Image outputs (F, S, C_out) and text outputs (F, L, ·) of one branch's frames.

    Frame f's image queries attend to [image of frame f, or of all frames if joint] + extra (k, v) + own text;
    its text queries to its own image + text."""
    q, k, v, tq, tk, tv = oracle_qkv(attn, img, txt)
    n = q.shape[0]
    imgs, txts = [], []
    for f in range(n):
        ks = [k.flatten(0, 1) if joint else k[f]] + ([extra[0]] if extra else []) + ([tk[f]] if tk is not None else [])
        vs = [v.flatten(0, 1) if joint else v[f]] + ([extra[1]] if extra else []) + ([tv[f]] if tv is not None else [])
        imgs.append(image_out(attn, softmax_attend(q[f], torch.cat(ks), torch.cat(vs))))
        if tq is not None:
            txts.append(text_out(attn, softmax_attend(tq[f], torch.cat([k[f], tk[f]]), torch.cat([v[f], tv[f]]))))
    return torch.stack(imgs), (torch.stack(txts) if txts else None)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- layers and installation --------------------------------------------------------------------------------

def test_layers_in_execution_order():
    assert joint_attention_layers(tiny_sd3("sd3")) == tuple(f"transformer_blocks.{i}.attn" for i in range(3))
    assert joint_attention_layers(tiny_sd3("sd35")) == ("transformer_blocks.0.attn", "transformer_blocks.0.attn2",
                                                       "transformer_blocks.1.attn", "transformer_blocks.2.attn")


def test_remove_restores_the_identical_processors(sd35):
    saved = dict(sd35.attn_processors)
    runtime = runtime_of()
    handle = install_joint_attention(sd35, runtime, joint_attention_layers(sd35))
    procs = sd35.attn_processors
    assert all(isinstance(p, TokenFlowJointAttention) for p in procs.values())
    assert {p.name for p in procs.values()} == set(joint_attention_layers(sd35))
    with pytest.raises(RuntimeError, match="already installed"):
        install_joint_attention(sd35, runtime)
    runtime.keyframe_tokens["transformer_blocks.0.attn"] = object()  # kept during a run: dropped on remove
    handle.remove()
    assert "transformer_blocks.0.attn" not in runtime.keyframe_tokens
    after = sd35.attn_processors
    assert after.keys() == saved.keys() and all(after[k] is saved[k] for k in saved)
    handle.remove()  # twice is harmless
    # only some layers: the others keep their (same) processor objects
    with install_joint_attention(sd35, runtime, ["transformer_blocks.1.attn"]):
        now = sd35.attn_processors
        assert isinstance(now["transformer_blocks.1.attn.processor"], TokenFlowJointAttention)
        assert all(now[k] is saved[k] for k in saved if k != "transformer_blocks.1.attn.processor")
    assert all(sd35.attn_processors[k] is saved[k] for k in saved)


def test_refuses_unknown_layers_and_processors(sd35):
    from diffusers.models.attention_processor import PAGJointAttnProcessor2_0

    with pytest.raises(ConfigError, match="not an attention layer"):
        install_joint_attention(sd35, runtime_of(), ["transformer_blocks.7.attn"])
    saved = dict(sd35.attn_processors)
    sd35.set_attn_processor({**saved, "transformer_blocks.1.attn.processor": PAGJointAttnProcessor2_0()})
    try:
        with pytest.raises(ConfigError, match="transformer_blocks.1.attn runs PAGJointAttnProcessor2_0"):
            install_joint_attention(sd35, runtime_of())
    finally:
        sd35.set_attn_processor(saved)


def test_patch_grid_derives_the_patch_size():
    assert patch_grid((8, 8), 16) == (4, 4)       # p = 2
    assert patch_grid((16, 8), 8) == (4, 2)       # p = 4
    assert patch_grid((128, 96), 3072) == (64, 48)
    with pytest.raises(ValueError, match="no patch size"):
        patch_grid((8, 8), 15)


# ---- the whole transformer: installed processors change nothing outside a run and in per-frame calls --------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("phase", [None, "frames"])
def test_transformer_matches_stock(variant, phase, monkeypatch):
    model = tiny_sd3(variant)
    calls = []
    original = TokenFlowJointAttention.__call__
    monkeypatch.setattr(TokenFlowJointAttention, "__call__",
                        lambda self, *a, **kw: calls.append(self.name) or original(self, *a, **kw))
    torch.manual_seed(1)
    n = 2 * 3  # (branches frames)
    inputs = dict(hidden_states=torch.randn(n, 16, 8, 8), encoder_hidden_states=torch.randn(n, L, 32),
                  pooled_projections=torch.randn(n, 32), timestep=torch.full((n,), 500.0))
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        runtime = runtime_of()
        with install_joint_attention(model, runtime):
            runtime.step = step_of(phase, [0, 1, 2]) if phase else None
            got = model(**inputs, return_dict=False)[0]
    assert calls == list(joint_attention_layers(model))  # every layer ran through TokenFlow's processor, in order
    assert model.transformer_blocks[-1].attn.context_pre_only  # the last block is in the comparison
    assert expected.abs().max() > 0.1
    err = _err(got, expected)
    print(f"{variant} phase={phase}: max abs error {err:.2e}")
    assert err <= 1e-6


# ---- extended joint attention against the oracle ------------------------------------------------------------

@pytest.mark.parametrize("layer", ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.2.attn"])
@pytest.mark.parametrize("joint", [True, False])
def test_extended_joint_attention_oracle(sd35, layer, joint):
    attn = sd35.get_submodule(layer)
    torch.manual_seed(2)
    img = torch.randn(3, S, C)
    txt = None if layer.endswith("attn2") else torch.randn(3, L, C)
    with torch.no_grad():
        got_img, got_txt = extended_joint_attention(attn, img, txt, joint=joint, chunk=5)
        want_img, want_txt = oracle(attn, img, txt, joint)
        if not joint:  # per frame: the stock processor too
            stock_img, stock_txt = stock(attn, img, txt)
            assert _err(got_img, stock_img) <= 1e-6
            assert txt is None or _err(got_txt, stock_txt) <= 1e-6
    errs = [_err(got_img, want_img)] + ([] if txt is None else [_err(got_txt, want_txt)])
    print(f"{layer} joint={joint}: max abs error image/text {errs}")
    assert got_img.shape == (3, S, C)
    assert (got_txt is None) == (txt is None)
    assert max(errs) <= 1e-5
    if joint and txt is not None:  # the frames really see each other; the text does not
        per_frame, per_frame_txt = oracle(attn, img, txt, joint=False)
        assert _err(got_img, per_frame) > 1e-3
        assert _err(got_txt, per_frame_txt) <= 1e-5


# ---- the processor by phase ---------------------------------------------------------------------------------

LAYER = "transformer_blocks.1.attn"


def call(proc, attn, img, txt):
    with torch.no_grad():
        return proc(attn, img, txt)


def keyframe_pass(sd35, runtime, src_kf, edit_kf, txt):
    """Keyframes 0 and 4: rows (source kf0, kf4, edit kf0, kf4)."""
    proc, attn = TokenFlowJointAttention(LAYER, runtime), sd35.get_submodule(LAYER)
    runtime.step = step_of("keyframes", [0, 4])
    return proc, attn, call(proc, attn, torch.cat([src_kf, edit_kf]), txt)


def test_keyframes_phase(sd35):
    runtime = runtime_of()
    torch.manual_seed(3)
    src_kf, edit_kf, txt = torch.randn(2, S, C), torch.randn(2, S, C), torch.randn(4, L, C)
    proc, attn, (img_out, txt_out) = keyframe_pass(sd35, runtime, src_kf, edit_kf, txt)
    with torch.no_grad():
        stock_img, stock_txt = stock(attn, torch.cat([src_kf, edit_kf]), txt)
        joint_img, joint_txt = oracle(attn, edit_kf, txt[2:], joint=True)
    errs = (_err(img_out[:2], stock_img[:2]), _err(img_out[2:], joint_img), _err(txt_out, stock_txt))
    print(f"keyframes: source vs stock {errs[0]:.2e}, edit vs oracle {errs[1]:.2e}, text vs per-frame stock {errs[2]:.2e}")
    assert errs[0] <= 1e-6 and errs[1] <= 1e-5 and errs[2] <= 1e-6
    kept = runtime.keyframe_tokens[LAYER]
    assert kept.ids == [0, 4]
    assert torch.equal(kept.source, src_kf)                 # the source branch's image input tokens
    assert torch.equal(kept.outputs, img_out[2:][None])     # the edit branch's image outputs (clean: source not kept)


def test_propagation_with_known_neighbours(sd35):
    """Keyframes 0 and 4 have the same source tokens; frame f's source tokens are a permutation of them, so token t
    of frame f takes keyframe output token perm_f(t) of both keyframes, blended (4 - f)/4 : f/4 (paper blend)."""
    runtime = runtime_of(TokenFlowPropagator(blend="paper"))
    torch.manual_seed(4)
    base = torch.randn(S, C)
    src_kf, edit_kf, txt_kf = torch.stack([base, base]), torch.randn(2, S, C), torch.randn(4, L, C)
    proc, attn, (kf_img, _) = keyframe_pass(sd35, runtime, src_kf, edit_kf, txt_kf)
    frames = [1, 2, 3]
    perms = [torch.randperm(S) for _ in frames]
    src = torch.stack([base[p] for p in perms])
    edit, txt = torch.randn(3, S, C), torch.randn(6, L, C)
    matches = []
    runtime.on_match = lambda layer, fr, kf, index, sim: matches.append((fr.tolist(), kf, index.clone()))
    runtime.step = step_of("propagate", frames, keyframes=[0, 4])
    img_out, txt_out = call(proc, attn, torch.cat([src, edit]), txt)
    e0, e4 = kf_img[2], kf_img[3]
    want = torch.stack([(4 - f) / 4 * e0[p] + f / 4 * e4[p] for f, p in zip(frames, perms)])
    with torch.no_grad():
        stock_img, stock_txt = stock(attn, torch.cat([src, edit]), txt)
    errs = (_err(img_out[3:], want), _err(img_out[:3], stock_img[:3]), _err(txt_out, stock_txt))
    print(f"propagate: edit vs hand blend {errs[0]:.2e}, source vs stock {errs[1]:.2e}, text vs per-frame {errs[2]:.2e}")
    assert errs[0] <= 1e-6 and errs[1] <= 1e-6 and errs[2] <= 1e-6
    for fr, kf, index in matches:  # the neighbours found are the permutations
        for row, f in enumerate(fr):
            assert torch.equal(index[row].cpu(), perms[frames.index(f)])
    assert {kf for _, kf, _ in matches} == {0, 4}


class StubPropagator(Propagator):
    """Returns known values and records the query."""

    uses_keyframes = True
    needs_source = False
    source_features = "clean"

    def __init__(self):
        self.queries = []

    def propagate(self, query):
        self.queries.append(query)
        b, _, s, c = query.keyframe_outputs.shape
        return torch.arange(b * len(query.frames) * s * c, dtype=torch.float32).reshape(b, len(query.frames), s, c)


def test_propagation_query_and_text_per_frame(sd35):
    stub = StubPropagator()
    runtime = runtime_of(stub)
    torch.manual_seed(5)
    proc, attn, (kf_img, _) = keyframe_pass(sd35, runtime, torch.randn(2, S, C), torch.randn(2, S, C),
                                            torch.randn(4, L, C))
    assert runtime.keyframe_tokens[LAYER].source is None  # the stub does not need source tokens
    runtime.step = step_of("propagate", [2, 3], keyframes=[0, 4])
    x, txt = torch.randn(4, S, C), torch.randn(4, L, C)
    img_out, txt_out = call(proc, attn, x, txt)
    (query,) = stub.queries
    assert query.layer == LAYER and query.grid == (4, 4) and query.timestep == 500
    assert query.frames.tolist() == [2, 3] and query.keyframes.tolist() == [0, 4]
    assert torch.equal(query.keyframe_outputs, kf_img[2:][None]) and query.source is None
    assert torch.equal(img_out[2:], stub.propagate(query)[0])  # the edit branch's image tokens: the propagator's
    with torch.no_grad():
        stock_img, stock_txt = stock(attn, x, txt)
    assert _err(img_out[:2], stock_img[:2]) <= 1e-6           # the clean source: its own attention
    assert _err(txt_out, stock_txt) <= 1e-6                   # every branch's text tokens: per frame


def test_anchors_and_anchored(sd35):
    """anchors: joint over the anchors; anchored: own image + the anchors' image + own text; text per frame."""
    runtime = runtime_of()
    attn = sd35.get_submodule(LAYER)
    proc = TokenFlowJointAttention(LAYER, runtime)
    torch.manual_seed(6)
    anchor_src, anchor_edit, anchor_txt = torch.randn(2, S, C), torch.randn(2, S, C), torch.randn(4, L, C)
    runtime.step = step_of("anchors", [0, 4], keyframes=[0, 2, 4, 6])
    a_img, _ = call(proc, attn, torch.cat([anchor_src, anchor_edit]), anchor_txt)
    assert _err(a_img[2:], oracle(attn, anchor_edit, anchor_txt[2:], joint=True)[0]) <= 1e-5
    src, edit, txt = torch.randn(2, S, C), torch.randn(2, S, C), torch.randn(4, L, C)
    runtime.step = step_of("anchored", [2, 6], keyframes=[0, 2, 4, 6])
    img_out, txt_out = call(proc, attn, torch.cat([src, edit]), txt)
    _, ak, av, *_ = oracle_qkv(attn, anchor_edit, None)
    with torch.no_grad():
        want_img, want_txt = oracle(attn, edit, txt[2:], joint=False, extra=(ak.flatten(0, 1), av.flatten(0, 1)))
        stock_img, stock_txt = stock(attn, torch.cat([src, edit]), txt)
    errs = (_err(img_out[2:], want_img), _err(img_out[:2], stock_img[:2]), _err(txt_out, stock_txt))
    print(f"anchored: edit vs oracle {errs[0]:.2e}, source vs stock {errs[1]:.2e}, text vs per-frame {errs[2]:.2e}")
    assert errs[0] <= 1e-5 and errs[1] <= 1e-6 and errs[2] <= 1e-6
    assert runtime.keyframe_tokens[LAYER].ids == [0, 2, 4, 6]


class InjectQK(_Plain):
    """PnP-style: the edit branch takes the source branch's image queries and keys; records what it is given."""

    def __init__(self):
        self.seen = []

    def self_attention(self, layer, q, k, v, step):
        self.seen.append((layer, step.phase, q.clone(), k.clone(), v.clone()))
        q, k = q.clone(), k.clone()
        q[1], k[1] = q[0], k[0]
        return q, k, v


def test_editor_hook_sees_normed_image_qkv(sd35):
    editor = InjectQK()
    runtime = runtime_of(editor=editor)
    attn = sd35.get_submodule(LAYER)
    proc = TokenFlowJointAttention(LAYER, runtime)
    torch.manual_seed(7)
    src, edit, txt = torch.randn(2, S, C), torch.randn(2, S, C), torch.randn(4, L, C)
    runtime.step = step_of("frames", [0, 1])
    img_out, txt_out = call(proc, attn, torch.cat([src, edit]), txt)
    ((layer, phase, q, k, v),) = editor.seen
    assert layer == LAYER and phase == "frames" and q.shape == (2, 2, S, C)  # (B, F, S, C) by branch, image only
    oq, ok, ov, *_ = oracle_qkv(attn, torch.cat([src, edit]), None)
    assert _err(q, oq.flatten(-2).unflatten(0, (2, 2))) <= 1e-5  # after the qk-norm
    assert _err(k, ok.flatten(-2).unflatten(0, (2, 2))) <= 1e-5
    # the product reads what the hook returned: the edit rows with the source's Q/K and their own V
    sq, sk, _, _, stk, stv = oracle_qkv(attn, src, txt[:2])
    eq, ek, ev, etq, etk, etv = oracle_qkv(attn, edit, txt[2:])
    for f in range(2):
        want = image_out(attn, softmax_attend(sq[f], torch.cat([sk[f], etk[f]]), torch.cat([ev[f], etv[f]])))
        assert _err(img_out[2 + f], want) <= 1e-5
        want_txt = text_out(attn, softmax_attend(etq[f], torch.cat([sk[f], etk[f]]), torch.cat([ev[f], etv[f]])))
        assert _err(txt_out[2 + f], want_txt) <= 1e-5
