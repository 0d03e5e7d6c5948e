"""Self-attention processors that implement TokenFlow inside an unmodified diffusers UNet.

One :class:`TokenFlowSelfAttention` per self-attention layer (``attn1`` of every transformer block).
What it does depends on the phase of the UNet call, read from the shared :class:`TokenFlowRuntime`:

* ``keyframes``: branches marked ``joint`` run *extended* attention (each keyframe's queries attend
  to the keys/values of all keyframes in the call, via ``scaled_dot_product_attention``; above
  ``max_kv_frames`` keyframes to AdaFlow's slimmed selection of them, :mod:`tokenflow.core.slimming`);
  the source branch runs per-frame attention. What propagation reads is kept: the source branch's input
  tokens and the propagated branches' outputs, by keyframe.
* ``anchors``: as ``keyframes`` (joint over the call's keyframes, the *anchors*), and the joint
  branches' keys and values are kept as the step's shared attention context.
* ``anchored``: each keyframe of the call attends to its own keys/values and the anchors' — a bounded
  context, the same whatever other keyframes exist (long videos, :class:`KeyframeAttention`).
* ``propagate``: the edit branches' attention is not computed; each token takes the keyframe output
  the propagator gives it. The source branch computes its own attention (``clean`` source features)
  or is propagated too.
* ``frames``: ordinary per-frame attention (per-frame baseline, plain sampling).

The editor's ``self_attention`` hook (e.g. PnP Q/K injection) runs wherever attention is computed.
Installing saves the UNet's processors; :meth:`TokenFlowRuntime.remove` puts the very same objects back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from tokenflow.core.editor import SOURCE, KeyframeEditor, Phase, Step
from tokenflow.core.propagation import CorrespondenceCallback, PropagationQuery, Propagator, SourceFeatures
from tokenflow.core.clips import features_at
from tokenflow.core.slimming import gather_tokens, reference_selection, slim_budget, slim_selection
from tokenflow.errors import ConfigError
from tokenflow.models.layout import MMDiTLayout, UNetLayout, check_attention_supported, token_grid
from tokenflow.options import choice


class Slimming(str, Enum):
    default = "default"       # scored per layer on the source branch's tokens, own tokens always kept
    reference = "reference"   # AdaFlow's: the video features (DIFT) per resolution, the plain top-k


class KeyframeContext(str, Enum):
    auto = "auto"         # all keyframes up to max_kv_frames (the paper), AdaFlow's slimmed selection above
    all = "all"           # every keyframe attends to all keyframes of the step (the paper; one UNet call)
    anchors = "anchors"   # every keyframe attends to itself and a few anchor keyframes (bounded memory)


@dataclass
class KeyframeAttention:
    """What each keyframe attends to in the keyframe pass.

    ``auto`` (the default): one UNet call over all K keyframes; while K is at most ``max_kv_frames`` each
    attends to every keyframe (the method, unchanged), above it to its own tokens and the most similar of
    the others', ``max_kv_frames`` keyframes' worth in all (AdaFlow's adaptive attention slimming,
    :mod:`tokenflow.core.slimming`): attention cost linear in K. ``all``: every keyframe, whatever K
    (the paper; scores grow as K²). ``anchors``: ``anchors`` keyframes spread evenly over the step's
    keyframes are edited jointly first; every other keyframe attends to its own tokens and the anchors'
    (a fixed global subset), in calls of ``chunk_size`` frames, and the video is processed in segments of
    ``segment`` keyframes so only those keyframes' tokens are held: memory flat in video length.
    """

    context: KeyframeContext = KeyframeContext.auto
    anchors: int = 4
    segment: int = 4
    max_kv_frames: int = 20  # auto: keyframes read in full (AdaFlow's max_kv_size); above, its slimmed context
    slimming: Slimming = Slimming.default  # how the slimmed context is scored (see tokenflow.core.slimming)

    def __post_init__(self) -> None:
        self.context = choice(KeyframeContext, self.context, "attention.context")
        self.slimming = choice(Slimming, self.slimming, "attention.slimming")
        if self.anchors < 1 or self.segment < 1:
            raise ConfigError(f"attention.anchors={self.anchors} and attention.segment={self.segment} must be >= 1 — "
                              "e.g. anchors=4 segment=4")
        if int(self.max_kv_frames) < 1:
            raise ConfigError(f"attention.max_kv_frames={self.max_kv_frames} must be >= 1 — AdaFlow's default is 20")

    @property
    def bounded(self) -> bool:
        return self.context == KeyframeContext.anchors

    @property
    def slim_above(self) -> int | None:
        """Keyframe count above which the keyframe pass is slimmed (``auto``), else None (never)."""
        return int(self.max_kv_frames) if self.context == KeyframeContext.auto else None


@dataclass
class KeyframeTokens:
    """What a layer keeps from keyframe passes for propagation, by keyframe (``ids``, sorted global indices):
    the source branch's input tokens (K, S, C) when the propagator reads them, and the outputs (B', K, S, C)
    of the branches it propagates."""

    ids: list[int]
    source: Tensor | None
    outputs: Tensor

    def merged(self, other: "KeyframeTokens") -> "KeyframeTokens":
        """This and ``other``'s keyframes together, sorted by keyframe index (``other`` wins on a repeat)."""
        ids = sorted(set(self.ids) | set(other.ids))
        pick = [(other, other.ids.index(i)) if i in other.ids else (self, self.ids.index(i)) for i in ids]
        source = None if self.source is None else torch.stack([t.source[j] for t, j in pick])  # type: ignore[index]
        return KeyframeTokens(ids, source, torch.stack([t.outputs[:, j] for t, j in pick], dim=1))

    def kept(self, ids: set[int]) -> "KeyframeTokens | None":
        """Only the keyframes in ``ids`` (None when none remain)."""
        pos = [j for j, i in enumerate(self.ids) if i in ids]
        if not pos:
            return None
        return KeyframeTokens([self.ids[j] for j in pos], None if self.source is None else self.source[pos],
                              self.outputs[:, pos])


@dataclass
class TokenFlowRuntime:
    """State shared by the processors of one run, owned by the pipeline (never global)."""

    editor: KeyframeEditor
    propagator: Propagator
    latent_hw: tuple[int, int] = (64, 64)  # (h, w) of the latents: gives each layer's token grid
    attention_chunk: int = 4096  # query tokens per SDPA call in extended attention (memory bound)
    max_kv_frames: int | None = None  # keyframe passes over more keyframes are slimmed (AdaFlow); None: never
    slim_features: Tensor | None = None  # (N, h, w, C) video features scoring the slimming (reference); None: tokens
    on_match: CorrespondenceCallback | None = None
    step: Step | None = None
    keyframe_tokens: dict[str, KeyframeTokens] = field(default_factory=dict)
    anchor_kv: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> anchors' K, V (Bj, A, S, C)
    _saved: dict | None = None
    _handles: list = field(default_factory=list)
    _unet: torch.nn.Module | None = None
    _joint: Any = None  # the installed joint-attention processors of an MMDiT (tokenflow.core.joint_attention)
    _slim_memo: dict = field(default_factory=dict)  # (grid, keyframes) -> this step's reference selection

    def install(self, unet: torch.nn.Module, layout: "UNetLayout | MMDiTLayout") -> "TokenFlowRuntime":
        """Install the processors into ``unet`` (the model's denoiser: a UNet, or an MMDiT transformer whose
        joint attention runs :class:`~tokenflow.core.joint_attention.TokenFlowJointAttention`) and the editor's hooks."""
        if self._saved is not None or self._joint is not None:
            raise RuntimeError("processors already installed; call remove() first")
        if isinstance(layout, MMDiTLayout):
            from tokenflow.core.joint_attention import install_joint_attention

            self._joint = install_joint_attention(unet, self, layout.self_attention)
            self._unet = unet
            self._handles = list(self.editor.install(unet, layout, lambda: self.step))
            return self
        for name in layout.self_attention:
            check_attention_supported(unet.get_submodule(name), name, "TokenFlow processor")
        self._saved = dict(unet.attn_processors)
        procs = dict(self._saved)
        for name in layout.self_attention:
            procs[f"{name}.processor"] = TokenFlowSelfAttention(name, self)
        unet.set_attn_processor(procs)
        self._unet = unet
        self._handles = list(self.editor.install(unet, layout, lambda: self.step))
        return self

    def keep_keyframes(self, ids: set[int]) -> None:
        """Drop the stored tokens of every keyframe not in ``ids`` (propagation will not read them again)."""
        for name in list(self.keyframe_tokens):
            kept = self.keyframe_tokens[name].kept(ids)
            if kept is None:
                del self.keyframe_tokens[name]
            else:
                self.keyframe_tokens[name] = kept

    def clear_step(self) -> None:
        """Forget everything kept for the current denoising step."""
        self.keyframe_tokens.clear()
        self.anchor_kv.clear()
        self._slim_memo.clear()

    def slimming(self, frames: Tensor, grid: tuple[int, int], tokens: Tensor) -> Tensor | None:
        """The slimmed context (K, budget) of a keyframe call over ``frames`` (K,) at a layer with token ``grid``,
        or None for full extended attention: scored on ``tokens`` (K, S, C) (the source branch's), or with
        ``attention.slimming=reference`` on :attr:`slim_features` at this grid, once per step and grid."""
        budget = slim_budget(tokens.shape[0], tokens.shape[1], self.max_kv_frames)
        if budget is None:
            return None
        if self.slim_features is None:
            return slim_selection(tokens, budget)
        key = (tuple(grid), tuple(int(f) for f in frames.tolist()))
        if key not in self._slim_memo:
            self._slim_memo[key] = reference_selection(features_at(self.slim_features, frames, grid, tokens.device),
                                                       budget)
        return self._slim_memo[key]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._joint is not None:
            self._joint.remove()
            self._joint = None
        if self._saved is not None and self._unet is not None:
            self._unet.set_attn_processor(self._saved)
        self._saved, self._unet = None, None
        self.clear_step()

    def __enter__(self) -> "TokenFlowRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _heads(x: Tensor, heads: int) -> Tensor:
    return rearrange(x, "n s (h d) -> n h s d", h=heads)


def propagated_branches(step: Step, propagator: Propagator) -> list[int]:
    """Positions of the branches whose attention outputs propagation carries: every joint branch, and the source
    branch unless the propagator reads it ``clean`` (it then attends per frame). Any other non-joint branch (e.g.
    FlowEdit's source-prompt branches) attends per frame in every phase and is never propagated."""
    src = step.index_of(SOURCE)
    clean = propagator.source_features == SourceFeatures.clean
    return [i for i, b in enumerate(step.branches) if (i == src and not clean) or (i != src and b.joint)]


class TokenFlowSelfAttention:
    """Attention processor for one self-attention layer; see the module docstring."""

    def __init__(self, name: str, runtime: TokenFlowRuntime) -> None:
        self.name, self.runtime = name, runtime

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        step = self.runtime.step
        if step is None:  # called outside a TokenFlow run: behave like plain attention
            return self._attend(attn, *self._qkv(attn, hidden_states.unsqueeze(0)), joint=False)[0]
        n_branches = len(step.branches)
        x = rearrange(hidden_states, "(b f) s c -> b f s c", b=n_branches)
        src = step.index_of(SOURCE)
        if step.phase is Phase.propagate and self.runtime.propagator.propagates(self.name):
            out = self._propagate(attn, x, step, src)
        elif step.phase is Phase.propagate:  # a layer left out of propagation (ablation): its own attention, per frame
            q, k, v = self.runtime.editor.self_attention(self.name, *self._qkv(attn, x), step)
            out = self._attend(attn, q, k, v, joint=False)
        else:
            q, k, v = self.runtime.editor.self_attention(self.name, *self._qkv(attn, x), step)
            joint = [b.joint and step.phase in (Phase.keyframes, Phase.anchors) for b in step.branches]
            selection = self._slimming(x, step, src) if step.phase is Phase.keyframes and any(joint) else None
            if step.phase is Phase.anchored:
                out = self._anchored(attn, q, k, v, step)
            elif selection is not None:
                out = torch.stack([self._slimmed(attn, q[i], k[i], v[i], selection) if joint[i] else
                                   self._attend(attn, q[i:i+1], k[i:i+1], v[i:i+1], False)[0] for i in range(n_branches)])
            else:
                out = torch.stack([self._attend(attn, q[i:i+1], k[i:i+1], v[i:i+1], joint[i])[0]
                                   for i in range(n_branches)])
            if step.phase is Phase.anchors:
                shared = [i for i, b in enumerate(step.branches) if b.joint]
                self.runtime.anchor_kv[self.name] = (k[shared], v[shared])
            if step.phase in (Phase.keyframes, Phase.anchors, Phase.anchored) and self.runtime.propagator.propagates(self.name):
                self._keep(x, out, step, src)
        return rearrange(out, "b f s c -> (b f) s c")

    def _keep(self, x: Tensor, out: Tensor, step: Step, src: int | None) -> None:
        """Store what propagation will read for this call's keyframes (and nothing else)."""
        propagator = self.runtime.propagator
        keep = propagated_branches(step, propagator)
        source = x[src] if src is not None and propagator.needs_source else None
        tokens = KeyframeTokens([int(f) for f in step.frames.tolist()], source, out[keep])
        previous = self.runtime.keyframe_tokens.get(self.name)
        self.runtime.keyframe_tokens[self.name] = tokens if previous is None else previous.merged(tokens)

    @staticmethod
    def _qkv(attn, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, F, S, C) → q, k, v (B, F, S, C')."""
        return attn.to_q(x), attn.to_k(x), attn.to_v(x)

    def _attend(self, attn, q: Tensor, k: Tensor, v: Tensor, joint: bool) -> Tensor:
        """q, k, v (B, F, S, C) → attention output (B, F, S, C_out), projected by ``to_out``.

        joint: every frame's queries attend to all F frames' keys/values (extended attention).
        """
        b, f, s, _ = q.shape
        h = attn.heads
        if joint:
            kk = _heads(rearrange(k, "b f s c -> b (f s) c"), h)
            vv = _heads(rearrange(v, "b f s c -> b (f s) c"), h)
            qq = _heads(rearrange(q, "b f s c -> b (f s) c"), h)
            parts = [F.scaled_dot_product_attention(qc, kk, vv) for qc in qq.split(self.runtime.attention_chunk, dim=2)]
            out = rearrange(torch.cat(parts, dim=2), "b h (f s) d -> b f s (h d)", f=f)
        else:
            qq, kk, vv = (_heads(rearrange(t, "b f s c -> (b f) s c"), h) for t in (q, k, v))
            out = rearrange(F.scaled_dot_product_attention(qq, kk, vv), "(b f) h s d -> b f s (h d)", b=b)
        return self._project(attn, out)

    def _slimming(self, x: Tensor, step: Step, src: int | None) -> Tensor | None:
        """AdaFlow's selection (K, budget) for this keyframe call, or None for full extended attention; scored on
        the source branch's input tokens (the first joint branch's without one) or the video features."""
        features = x[src] if src is not None else x[next(i for i, b in enumerate(step.branches) if b.joint)]
        return self.runtime.slimming(step.frames, token_grid(self.runtime.latent_hw, x.shape[2]), features)

    def _slimmed(self, attn, q: Tensor, k: Tensor, v: Tensor, selection: Tensor) -> Tensor:
        """One branch's keyframes, q, k, v (F, S, C): frame f's queries attend to the pooled tokens
        ``selection[f]`` → (F, S, C_out)."""
        h, outs = attn.heads, []
        for f in range(q.shape[0]):
            kk, vv = (_heads(gather_tokens(t, selection[f]).unsqueeze(0), h) for t in (k, v))
            qq = _heads(q[f:f + 1], h)
            parts = [F.scaled_dot_product_attention(qc, kk, vv) for qc in qq.split(self.runtime.attention_chunk, dim=2)]
            outs.append(rearrange(torch.cat(parts, dim=2), "1 h s d -> s (h d)"))
        return self._project(attn, torch.stack(outs))

    @staticmethod
    def _project(attn, out: Tensor) -> Tensor:
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def _anchored(self, attn, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """Each frame's queries attend to its own keys/values and the anchors' (joint branches); the other
        branches per frame. q, k, v (B, F, S, C) → (B, F, S, C_out)."""
        anchor_k, anchor_v = self.runtime.anchor_kv[self.name]  # (Bj, A, S, C)
        h, outs, j = attn.heads, [], 0
        for i, branch in enumerate(step.branches):
            if not branch.joint:
                outs.append(self._attend(attn, q[i:i+1], k[i:i+1], v[i:i+1], joint=False)[0])
                continue
            n = q.shape[1]
            kk = torch.cat([k[i].unsqueeze(1), anchor_k[j].unsqueeze(0).expand(n, -1, -1, -1)], dim=1)
            vv = torch.cat([v[i].unsqueeze(1), anchor_v[j].unsqueeze(0).expand(n, -1, -1, -1)], dim=1)
            kk, vv = (_heads(rearrange(t, "f a s c -> f (a s) c"), h) for t in (kk, vv))
            qq = _heads(q[i], h)
            parts = [F.scaled_dot_product_attention(qc, kk, vv) for qc in qq.split(self.runtime.attention_chunk, dim=2)]
            outs.append(self._project(attn, rearrange(torch.cat(parts, dim=2), "f h s d -> f s (h d)")))
            j += 1
        return torch.stack(outs)

    def _propagate(self, attn, x: Tensor, step: Step, src: int | None) -> Tensor:
        """Outputs of every branch for the frames of a propagate-phase call, x (B, F, S, C)."""
        stored = self.runtime.keyframe_tokens.get(self.name)
        propagator = self.runtime.propagator
        if stored is None:
            raise RuntimeError(f"{self.name}: propagation needs the keyframe pass first")
        if propagator.needs_source and (src is None or stored.source is None):
            raise RuntimeError(f"{self.name}: {type(propagator).__name__} needs the source branch in the UNet batch")
        # the source branch's own attention is computed per frame in `clean` mode (else propagated too), as is that
        # of any other non-joint branch
        moved = propagated_branches(step, propagator)
        query = PropagationQuery(
            layer=self.name, grid=token_grid(self.runtime.latent_hw, x.shape[2]), timestep=step.timestep,
            frames=step.frames, keyframes=torch.tensor(stored.ids, dtype=torch.long), keyframe_outputs=stored.outputs,
            source=x[src] if propagator.needs_source else None,
            keyframe_source=stored.source if propagator.needs_source else None, on_match=self.runtime.on_match)
        propagated = propagator.propagate(query)
        if len(moved) == x.shape[0]:
            return propagated
        out = propagated.new_empty(x.shape[0], *propagated.shape[1:])
        out[moved] = propagated
        for i in sorted(set(range(x.shape[0])) - set(moved)):  # e.g. the unmodified source
            out[i] = self._attend(attn, *self._qkv(attn, x[i : i + 1]), joint=False)[0]
        return out
