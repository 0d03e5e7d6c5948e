"""TokenFlow inside an unmodified MMDiT: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``) and FLUX.1
(``FluxTransformer2DModel``).

SD3's blocks (``JointTransformerBlock``) run one *joint* attention (``block.attn``) over the image
tokens ``hidden_states`` (B, S, C) and the text tokens ``encoder_hidden_states`` (B, L, C): each is
projected on its own (``to_q/k/v``, ``add_q/k/v_proj``), RMS-normed per head where the layer has the
norms (SD 3.5), concatenated image-first and attended in one product; ``to_out`` projects the image
part and ``to_add_out`` the text part (except in the last block, ``context_pre_only``, whose text
output is dropped). SD 3.5's dual-attention blocks add ``block.attn2``: image-only self-attention.
Positions are absolute 2-D embeddings added before the blocks, so tokens of different frames can be
attended together as they are.

FLUX.1's double-stream blocks (``transformer_blocks.i.attn``, ``FluxAttention`` with ``FluxAttnProcessor``)
are the same joint attention with the text tokens first and rotary position embeddings (RoPE, from the
text ids — zeros — and each token's (row, column) id) applied to queries and keys after the qk-norm. Its
single-stream blocks (``single_transformer_blocks.j.attn``) receive text and image tokens concatenated
(text first) through one set of projections and return the attention output unprojected (``pre_only``);
the processor is not told where the text ends, so it is given the image token count explicitly (from the
run's latent size and the 2x2 packing) and splits there. Every frame's image tokens carry their own
positions — the frames share one grid, so positions repeat across frames in extended attention — and RoPE
is applied per frame before keys of several frames are concatenated. Everything below applies to both
families; order within the key sequence does not change a softmax.

:class:`TokenFlowJointAttention` (one per such layer, sharing a :class:`TokenFlowRuntime` with the
pipeline) does what :class:`~tokenflow.core.attention.TokenFlowSelfAttention` does on the UNet, by
phase of the call (rows of the batch are ``(branches frames)``):

* no step (outside a run) and ``frames``: exactly the stock ``JointAttnProcessor2_0``, per frame.
* ``keyframes``: joint branches run *extended* joint attention over the call's keyframes — each
  keyframe's image queries attend to the image keys/values of every keyframe of the branch plus its
  own frame's text keys/values; the source branch (and any other non-joint branch) runs per frame.
  What propagation reads is kept as :class:`KeyframeTokens`: the source branch's *image* input tokens
  and the propagated branches' *image* attention outputs (after ``to_out``).
* ``anchors``: as ``keyframes``; the joint branches' image keys/values are kept as the step's anchors.
* ``anchored``: each keyframe's image queries attend to its own image tokens, the anchors' image tokens
  and its own text tokens (bounded context, as on the UNet).
* ``propagate``: the edit branches' *image* outputs are the propagator's
  (:class:`~tokenflow.core.propagation.PropagationQuery` on the layer's (h/p, w/p) patch grid); the
  source branch attends per frame in ``clean`` mode (propagated with the others otherwise).

Text tokens stay per frame in every phase: a frame's text queries attend to that frame's own image and
text tokens only (what the stock processor computes for that frame). They are never propagated — text
tokens have no spatial position to match — so in the ``propagate`` phase they are *computed* for every
branch, against the frame's own image keys/values; their output feeds the text stream of the next
blocks, and thereby the frame's image tokens in the layers that are not propagated.

The editor's ``self_attention(layer, q, k, v, step)`` hook receives the *image* queries, keys and values
(B, F, S, C) by branch, **after** the qk RMS-norm (where the layer has it) and before the text tokens are
appended: what it returns is exactly what the product reads, so Plug-and-Play-style Q/K injection copies
normalised queries/keys and cannot be undone by the norm. C = heads·head_dim, head h at channels
[h·d, (h+1)·d), as on the UNet. Text Q/K/V are not shown to the hook. The hook runs in every phase where
attention is computed, ``propagate`` included (there the text queries read the hooked image keys/values,
and the ``clean`` source branch its hooked Q/K/V).

Attention goes through ``diffusers.models.attention_dispatch.dispatch_attention_fn`` (layout
(B, S, H, D)), so the backend chosen with ``transformer.set_attention_backend`` or the
``attention_backend`` context manager applies; image queries are split in ``runtime.attention_chunk``
tokens per call to bound memory.

:func:`install_joint_attention` saves the transformer's processors and installs one
:class:`TokenFlowJointAttention` per layer; :meth:`JointAttentionHandle.remove` puts the very same
objects back.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from einops import rearrange
from torch import Tensor

from tokenflow.core.attention import KeyframeTokens, TokenFlowRuntime, propagated_branches
from tokenflow.core.editor import SOURCE, Phase, Step
from tokenflow.core.propagation import PropagationQuery
from tokenflow.core.slimming import gather_tokens
from tokenflow.errors import ConfigError
from tokenflow.models.layout import MMDiTLayout, patch_grid

__all__ = ["JointQKV", "joint_qkv", "extended_joint_attention", "image_attention", "text_attention", "patch_grid",
           "TokenFlowJointAttention", "JointAttentionHandle", "install_joint_attention", "joint_attention_layers"]


# ---- the computation, in pieces --------------------------------------------------------------------------

Rotary = tuple[Tensor, Tensor]  # (cos, sin), each (L + S, head_dim), over the [text, image] token order


@dataclass
class JointQKV:
    """Queries, keys and values of one joint-attention layer, by row (frame), layout (N, tokens, heads, head_dim),
    after the qk-norms: image ``q, k, v`` (N, S, H, D) and text ``tq, tk, tv`` (N, L, H, D) or None (``attn2``)."""

    q: Tensor
    k: Tensor
    v: Tensor
    tq: Tensor | None = None
    tk: Tensor | None = None
    tv: Tensor | None = None

    def rows(self, index: slice | list[int]) -> "JointQKV":
        """The same, for some rows only."""
        pick = (lambda t: None if t is None else t[index])
        return JointQKV(pick(self.q), pick(self.k), pick(self.v), pick(self.tq), pick(self.tk), pick(self.tv))


def joint_qkv(attn, img: Tensor, txt: Tensor | None, rotary: Rotary | None = None, single: bool = False) -> JointQKV:
    """Project as ``JointAttnProcessor2_0`` / ``FluxAttnProcessor``: img (N, S, C), txt (N, L, C') or None →
    :class:`JointQKV`.

    The per-head RMS norms (``norm_q``, ``norm_k``, ``norm_added_q``, ``norm_added_k``) act on the last
    (head_dim) axis, so applying them in (N, S, H, D) layout is the stock computation. ``single``: a FLUX
    single-stream layer, whose text tokens go through the same projections and norms as its image tokens.
    ``rotary``: FLUX's (cos, sin) over [text, image], applied after the norms to the text part (its first L
    rows) and the image part (the rest) of queries and keys.
    """
    q, k, v = attn.to_q(img), attn.to_k(img), attn.to_v(img)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.unflatten(-1, (attn.heads, head_dim)) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if txt is None:
        return JointQKV(*_rope((q, k), rotary, 0), v)
    if single:
        tq, tk, tv = (t.unflatten(-1, (attn.heads, head_dim)) for t in (attn.to_q(txt), attn.to_k(txt), attn.to_v(txt)))
        tq, tk = attn.norm_q(tq), attn.norm_k(tk)
    else:
        tq, tk, tv = (p(txt).unflatten(-1, (attn.heads, head_dim))
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
    n_text = txt.shape[1]
    q, k = _rope((q, k), rotary, n_text)
    tq, tk = _rope((tq, tk), None if rotary is None else (rotary[0][:n_text], rotary[1][:n_text]), 0)
    return JointQKV(q, k, v, tq, tk, tv)


def _rope(pair: tuple[Tensor, Tensor], rotary: Rotary | None, start: int) -> tuple[Tensor, Tensor]:
    """Queries and keys (N, S, H, D) rotated by rows ``start:start + S`` of ``rotary`` (diffusers'
    ``apply_rotary_emb``, the computation ``FluxAttnProcessor`` does on the concatenated sequence)."""
    if rotary is None:
        return pair
    from diffusers.models.embeddings import apply_rotary_emb

    n = pair[0].shape[1]
    part = (rotary[0][start : start + n], rotary[1][start : start + n])
    if part[0].shape[0] != n:
        raise ValueError(f"rotary embeddings for {rotary[0].shape[0]} tokens; the layer has {start + n}")
    return tuple(apply_rotary_emb(t, part, sequence_dim=1) for t in pair)  # type: ignore[return-value]


def _dispatch(q: Tensor, k: Tensor, v: Tensor, chunk: int, backend) -> Tensor:
    """Attention of q (B, Sq, H, D) on k, v (B, Sk, H, D), ``chunk`` queries per call → (B, Sq, H, D).

    ``backend``: the processor's ``_attention_backend``, or a (backend, parallel_config) pair as the processor
    holds them; both go to ``dispatch_attention_fn``."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend, parallel = backend if isinstance(backend, tuple) else (backend, None)
    parts = [dispatch_attention_fn(qc, k, v, dropout_p=0.0, is_causal=False, backend=backend, parallel_config=parallel)
             for qc in q.split(max(1, int(chunk)), dim=1)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def image_attention(qkv: JointQKV, joint: bool, chunk: int, backend=None,
                    extra: tuple[Tensor, Tensor] | None = None, selection: Tensor | None = None) -> Tensor:
    """Attention output of the image queries, (N, S, H·D), before ``to_out``.

    Row f's image queries attend to: the image keys/values of row f (``joint=False``) or of all N rows
    (``joint=True``: the N rows are the frames of one branch; with ``selection`` (N, budget), only the pooled
    N·S image tokens ``selection[f]``, AdaFlow's slimming), then ``extra`` (image keys/values (A, S', H, D)
    shared by every row, e.g. anchors; only with ``joint=False``), then row f's own text keys/values.
    """
    n, s, h, d = qkv.q.shape
    if joint and extra is not None:
        raise ValueError("extra keys/values are for per-frame (anchored) attention only")
    if joint and selection is not None:
        outs = []
        for f in range(n):
            ks, vs = [gather_tokens(qkv.k, selection[f]).unsqueeze(0)], [gather_tokens(qkv.v, selection[f]).unsqueeze(0)]
            if qkv.tk is not None:
                ks.append(qkv.tk[f : f + 1])
                vs.append(qkv.tv[f : f + 1])
            outs.append(_dispatch(qkv.q[f : f + 1], torch.cat(ks, dim=1), torch.cat(vs, dim=1), chunk, backend))
        out = torch.cat(outs)
    elif joint:
        shared_k, shared_v = qkv.k.reshape(1, n * s, h, d), qkv.v.reshape(1, n * s, h, d)
        if qkv.tk is None:  # every row reads the same keys: one batch of N·S queries
            out = _dispatch(qkv.q.reshape(1, n * s, h, d), shared_k, shared_v, chunk, backend).reshape(n, s, h, d)
        else:  # the keys differ by row in their text part only: one row at a time (memory N·S + L, not N·(N·S + L))
            out = torch.cat([_dispatch(qkv.q[f : f + 1], torch.cat([shared_k, qkv.tk[f : f + 1]], dim=1),
                                       torch.cat([shared_v, qkv.tv[f : f + 1]], dim=1), chunk, backend)
                             for f in range(n)])
    else:
        ks, vs = [qkv.k], [qkv.v]
        if extra is not None:
            ks.append(extra[0].reshape(1, -1, h, d).expand(n, -1, -1, -1))
            vs.append(extra[1].reshape(1, -1, h, d).expand(n, -1, -1, -1))
        if qkv.tk is not None:
            ks.append(qkv.tk)
            vs.append(qkv.tv)
        k, v = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for parts in (ks, vs))
        out = _dispatch(qkv.q, k, v, chunk, backend)
    return out.flatten(2).to(qkv.q.dtype)


def text_attention(qkv: JointQKV, chunk: int, backend=None) -> Tensor | None:
    """Attention output of the text queries, (N, L, H·D), before ``to_add_out``: row f's text queries attend to
    row f's own image and text keys/values (text stays per frame). None without text."""
    if qkv.tq is None:
        return None
    k, v = torch.cat([qkv.k, qkv.tk], dim=1), torch.cat([qkv.v, qkv.tv], dim=1)
    return _dispatch(qkv.tq, k, v, chunk, backend).flatten(2).to(qkv.tq.dtype)


def _image_out(attn, x: Tensor) -> Tensor:
    """``to_out``, or — in a FLUX single-stream (``pre_only``) layer — the un-projected output, as the stock processor."""
    if getattr(attn, "pre_only", False):
        return x
    return attn.to_out[1](attn.to_out[0](x))


def _text_out(attn, x: Tensor | None) -> Tensor | None:
    """``to_add_out``, or — in a ``context_pre_only`` / single-stream layer — the un-projected text output, as the
    stock processor returns it (SD 3's last block drops it)."""
    if x is None or attn.context_pre_only or getattr(attn, "pre_only", False):
        return x
    return attn.to_add_out(x)


def extended_joint_attention(attn, img: Tensor, txt: Tensor | None, joint: bool, chunk: int, backend=None,
                             qkv_hook: Callable[[JointQKV], JointQKV] | None = None, rotary: Rotary | None = None,
                             single: bool = False) -> tuple[Tensor, Tensor | None]:
    """Joint attention of the F frames of one branch: img (F, S, C), txt (F, L, C') or None (``attn2``).

    ``joint=True``: each frame's image queries attend to the image keys/values of all F frames plus its own
    text keys/values; each frame's text queries attend to its own image and text tokens. ``joint=False``: the
    stock ``JointAttnProcessor2_0``, frame by frame. ``qkv_hook`` may change the (normed) Q/K/V before the
    product. Returns (image output (F, S, C_out) after ``to_out``, text output after ``to_add_out`` — the raw
    text output in a ``context_pre_only`` layer, as the stock processor — or None without text). ``rotary`` and
    ``single``: FLUX's, see :func:`joint_qkv`.
    """
    qkv = joint_qkv(attn, img, txt, rotary, single)
    if qkv_hook is not None:
        qkv = qkv_hook(qkv)
    return (_image_out(attn, image_attention(qkv, joint, chunk, backend)),
            _text_out(attn, text_attention(qkv, chunk, backend)))


# ---- the processor ---------------------------------------------------------------------------------------

class TokenFlowJointAttention:
    """Attention processor for one MMDiT image self-attention layer (SD 3's ``transformer_blocks.i.attn`` / ``.attn2``,
    FLUX's double- and single-stream ``attn``); see the module docstring. Honours ``_attention_backend`` as set by
    ``transformer.set_attention_backend``. ``single``: a FLUX single-stream layer; ``patch``: latent pixels per
    token side (how many image tokens a frame has)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, name: str, runtime: TokenFlowRuntime, single: bool = False, patch: int = 2) -> None:
        self.name, self.runtime, self.single, self.patch = name, runtime, single, patch

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Rotary | None = None, *args, **kwargs):
        # attention_mask is ignored, as by JointAttnProcessor2_0 (FluxAttnProcessor's callers pass none)
        runtime, step = self.runtime, self.runtime.step
        chunk, backend, rotary = runtime.attention_chunk, self._backend, image_rotary_emb
        if step is None:  # outside a TokenFlow run: the stock processor (single-stream: one sequence)
            return self._result(*extended_joint_attention(attn, hidden_states, encoder_hidden_states, False, chunk,
                                                          backend, rotary=rotary))
        img, txt = self._streams(hidden_states, encoder_hidden_states)
        n_branches = len(step.branches)
        n_frames = img.shape[0] // n_branches
        src = step.index_of(SOURCE)
        propagator = runtime.propagator
        qkv = self._hook(joint_qkv(attn, img, txt, rotary, self.single), step, n_branches)
        rows = lambda i: slice(i * n_frames, (i + 1) * n_frames)  # noqa: E731  the rows of branch i

        if step.phase is Phase.propagate and propagator.propagates(self.name):
            img_out = self._propagate(attn, img, qkv, step, src, n_branches)
        elif step.phase in (Phase.keyframes, Phase.anchors, Phase.anchored):
            anchors = runtime.anchor_kv.get(self.name) if step.phase is Phase.anchored else None
            if step.phase is Phase.anchored and anchors is None:
                raise RuntimeError(f"{self.name}: the anchored phase needs the anchors pass first")
            parts, j = [], 0
            selection = self._slimming(img, step, src, n_branches) if step.phase is Phase.keyframes else None
            for i, branch in enumerate(step.branches):
                sub = qkv.rows(rows(i))
                if not branch.joint:
                    parts.append(image_attention(sub, False, chunk, backend))
                elif step.phase is Phase.anchored:
                    parts.append(image_attention(sub, False, chunk, backend, extra=(anchors[0][j], anchors[1][j])))
                    j += 1
                else:
                    parts.append(image_attention(sub, True, chunk, backend, selection=selection))
            img_out = _image_out(attn, torch.cat(parts))
            if step.phase is Phase.anchors:
                shared = [i for i, b in enumerate(step.branches) if b.joint]
                k = rearrange(qkv.k, "(b f) s h d -> b f s (h d)", b=n_branches)
                v = rearrange(qkv.v, "(b f) s h d -> b f s (h d)", b=n_branches)
                runtime.anchor_kv[self.name] = (k[shared], v[shared])
            if propagator.propagates(self.name):
                self._keep(img, img_out, step, src, n_branches)
        else:  # frames, or propagate in a layer left out of propagation (ablation): per frame
            img_out = _image_out(attn, image_attention(qkv, False, chunk, backend))
        return self._result(img_out, _text_out(attn, text_attention(qkv, chunk, backend)))

    def _slimming(self, img: Tensor, step: Step, src: int | None, n_branches: int) -> Tensor | None:
        """AdaFlow's selection (K, budget) over this keyframe call's image tokens, or None for full extended
        attention; scored on the source branch's input image tokens (the first joint branch's without one)."""
        n_frames = img.shape[0] // n_branches
        joint = [i for i, b in enumerate(step.branches) if b.joint]
        if not joint:
            return None
        i = src if src is not None else joint[0]
        return self.runtime.slimming(step.frames, patch_grid(self.runtime.latent_hw, img.shape[1]),
                                     img[i * n_frames:(i + 1) * n_frames])

    @property
    def _backend(self):
        """What ``dispatch_attention_fn`` is given: the backend and parallel config set on this processor."""
        return (self._attention_backend, self._parallel_config)

    def _streams(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(image tokens, text tokens) of the call: a single-stream layer's input split where the image tokens start
        (the frame's token count, from the run's latent size), else the two inputs as they come."""
        if not self.single:
            return hidden_states, encoder_hidden_states
        h, w = self.runtime.latent_hw
        n_image = (h // self.patch) * (w // self.patch)
        n_text = hidden_states.shape[1] - n_image
        if n_text < 0:
            raise RuntimeError(f"{self.name}: {hidden_states.shape[1]} tokens, fewer than the {n_image} image tokens of "
                               f"a {h}x{w} latent — the runtime's latent size is not this call's")
        return hidden_states[:, n_text:], hidden_states[:, :n_text]

    def _result(self, img: Tensor, txt: Tensor | None):
        if txt is None:
            return img
        return torch.cat([txt, img], dim=1) if self.single else (img, txt)

    def _hook(self, qkv: JointQKV, step: Step, n_branches: int) -> JointQKV:
        """The editor's ``self_attention`` on the normed (and, on FLUX, rotated) image Q/K/V, (B, F, S, C) by branch."""
        h = qkv.q.shape[2]
        q, k, v = (rearrange(t, "(b f) s h d -> b f s (h d)", b=n_branches) for t in (qkv.q, qkv.k, qkv.v))
        q2, k2, v2 = self.runtime.editor.self_attention(self.name, q, k, v, step)
        if q2 is q and k2 is k and v2 is v:
            return qkv
        for new, old in ((q2, q), (k2, k), (v2, v)):
            if new.shape != old.shape:
                raise ValueError(f"{self.name}: the editor's self_attention changed a shape {tuple(old.shape)} → "
                                 f"{tuple(new.shape)}")
        q2, k2, v2 = (rearrange(t, "b f s (h d) -> (b f) s h d", h=h) for t in (q2, k2, v2))
        return replace(qkv, q=q2, k=k2, v=v2)

    def _keep(self, x: Tensor, out: Tensor, step: Step, src: int | None, n_branches: int) -> None:
        """Store what propagation will read for this call's keyframes: the source branch's image input tokens and
        the propagated branches' image outputs (the structure of the UNet processors)."""
        propagator = self.runtime.propagator
        x = rearrange(x, "(b f) s c -> b f s c", b=n_branches)
        out = rearrange(out, "(b f) s c -> b f s c", b=n_branches)
        source = x[src] if src is not None and propagator.needs_source else None
        tokens = KeyframeTokens([int(f) for f in step.frames.tolist()], source, out[propagated_branches(step, propagator)])
        previous = self.runtime.keyframe_tokens.get(self.name)
        self.runtime.keyframe_tokens[self.name] = tokens if previous is None else previous.merged(tokens)

    def _propagate(self, attn, hidden_states: Tensor, qkv: JointQKV, step: Step, src: int | None,
                   n_branches: int) -> Tensor:
        """Image outputs ((B F), S, C_out) of a propagate-phase call: propagated, except the branches that attend per
        frame (the ``clean`` source branch, other non-joint branches)."""
        runtime, propagator = self.runtime, self.runtime.propagator
        stored = runtime.keyframe_tokens.get(self.name)
        if stored is None:
            raise RuntimeError(f"{self.name}: propagation needs the keyframe pass first")
        if propagator.needs_source and (src is None or stored.source is None):
            raise RuntimeError(f"{self.name}: {type(propagator).__name__} needs the source branch in the batch")
        x = rearrange(hidden_states, "(b f) s c -> b f s c", b=n_branches)
        moved = propagated_branches(step, propagator)
        query = PropagationQuery(
            layer=self.name, grid=patch_grid(runtime.latent_hw, x.shape[2]), timestep=step.timestep,
            frames=step.frames, keyframes=torch.tensor(stored.ids, dtype=torch.long), keyframe_outputs=stored.outputs,
            source=x[src] if propagator.needs_source else None,
            keyframe_source=stored.source if propagator.needs_source else None, on_match=runtime.on_match)
        propagated = propagator.propagate(query)  # (len(moved), F, S, C_out)
        if len(moved) == n_branches:
            return rearrange(propagated, "b f s c -> (b f) s c")
        n_frames = x.shape[1]
        out = propagated.new_empty(n_branches, *propagated.shape[1:])
        out[moved] = propagated
        for i in sorted(set(range(n_branches)) - set(moved)):  # their own attention (e.g. the unmodified source)
            own = image_attention(qkv.rows(slice(i * n_frames, (i + 1) * n_frames)), False, runtime.attention_chunk,
                                  self._backend)
            out[i] = _image_out(attn, own).to(out.dtype)
        return rearrange(out, "b f s c -> (b f) s c")


# ---- installing ------------------------------------------------------------------------------------------

def joint_attention_layers(transformer: torch.nn.Module) -> tuple[str, ...]:
    """``transformer_blocks.{i}.attn`` and, where the block has one, ``.attn2``, in execution order."""
    return MMDiTLayout.from_transformer(transformer).self_attention


def _check_supported(name: str, processor) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if not isinstance(processor, (JointAttnProcessor2_0, FluxAttnProcessor, TokenFlowJointAttention)):
        raise ConfigError(f"attention layer {name} runs {type(processor).__name__}, not JointAttnProcessor2_0 (SD 3) or "
                          "FluxAttnProcessor (FLUX) — TokenFlow's MMDiT processor reproduces only those; reset it with "
                          "transformer.set_default_attn_processor()")


class JointAttentionHandle:
    """TokenFlow processors installed in an MMDiT transformer; :meth:`remove` restores the saved processor objects."""

    def __init__(self, transformer: torch.nn.Module, runtime: TokenFlowRuntime, layers: tuple[str, ...],
                 saved: dict) -> None:
        self.transformer, self.runtime, self.layers, self._saved = transformer, runtime, layers, saved

    @property
    def installed(self) -> bool:
        return self._saved is not None

    def remove(self) -> None:
        if self._saved is None:
            return
        self.transformer.set_attn_processor(self._saved)
        self._saved = None
        for name in self.layers:  # what was kept for these layers belongs to the run just ended
            self.runtime.keyframe_tokens.pop(name, None)
            self.runtime.anchor_kv.pop(name, None)

    def __enter__(self) -> "JointAttentionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_joint_attention(transformer: torch.nn.Module, runtime: TokenFlowRuntime,
                            layers: tuple[str, ...] | list[str] | None = None) -> JointAttentionHandle:
    """Install a :class:`TokenFlowJointAttention` at each of ``layers`` (default: :func:`joint_attention_layers`);
    every other layer keeps its processor. The attention backend a layer had is carried over."""
    layout = MMDiTLayout.from_transformer(transformer)
    layers = tuple(layout.self_attention if layers is None else layers)
    saved = dict(transformer.attn_processors)
    if any(isinstance(p, TokenFlowJointAttention) for p in saved.values()):
        raise RuntimeError("TokenFlow joint-attention processors already installed; call remove() first")
    procs = dict(saved)
    for name in layers:
        key = f"{name}.processor"
        if key not in saved:
            raise ConfigError(f"{name} is not an attention layer of this transformer — choose among "
                              f"{list(joint_attention_layers(transformer))}")
        _check_supported(name, saved[key])
        proc = TokenFlowJointAttention(name, runtime, single=name in layout.single_stream, patch=layout.patch_size)
        proc._attention_backend = getattr(saved[key], "_attention_backend", None)
        proc._parallel_config = getattr(saved[key], "_parallel_config", None)
        procs[key] = proc
    transformer.set_attn_processor(procs)
    return JointAttentionHandle(transformer, runtime, layers, saved)
