"""Self-attention processors that implement TokenFlow inside an unmodified diffusers UNet.

One :class:`TokenFlowSelfAttention` per self-attention layer (``attn1`` of every transformer block).
What it does depends on the phase of the UNet call, read from the shared :class:`TokenFlowRuntime`:

* ``keyframes``: branches marked ``joint`` run *extended* attention (each keyframe's queries attend
  to the keys/values of all keyframes, via ``scaled_dot_product_attention``); the source branch runs
  per-frame attention. The layer input tokens of the source branch and every branch's output are kept.
* ``propagate``: the edit branches' attention is not computed; each token takes the keyframe output
  at its nearest neighbour (the propagator decides how). The source branch computes its own attention
  (``clean`` source features) or is propagated too.
* ``frames``: ordinary per-frame attention (per-frame baseline, plain sampling).

The editor's ``self_attention`` hook (e.g. PnP Q/K injection) runs wherever attention is computed.
Installing saves the UNet's processors; :meth:`TokenFlowRuntime.remove` puts the very same objects back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from tokenflow.core.editor import SOURCE, KeyframeEditor, Step
from tokenflow.core.propagation import CorrespondenceCallback, PropagationQuery, Propagator
from tokenflow.models.layout import UNetLayout, check_attention_supported, token_grid


@dataclass
class KeyframeTokens:
    """What a layer keeps from the keyframe pass for propagation: the source branch's input tokens (K, S, C)
    when the propagator reads them, and the outputs (B', K, S, C) of the branches it propagates."""

    source: Tensor | None
    outputs: Tensor


@dataclass
class TokenFlowRuntime:
    """State shared by the processors of one run, owned by the pipeline (never global)."""

    editor: KeyframeEditor
    propagator: Propagator
    latent_hw: tuple[int, int] = (64, 64)  # (h, w) of the latents: gives each layer's token grid
    attention_chunk: int = 4096  # query tokens per SDPA call in extended attention (memory bound)
    on_match: CorrespondenceCallback | None = None
    step: Step | None = None
    keyframe_tokens: dict[str, KeyframeTokens] = field(default_factory=dict)
    _saved: dict | None = None
    _handles: list = field(default_factory=list)
    _unet: torch.nn.Module | None = None

    def install(self, unet: torch.nn.Module, layout: UNetLayout) -> "TokenFlowRuntime":
        if self._saved is not None:
            raise RuntimeError("processors already installed; call remove() first")
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

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._saved is not None and self._unet is not None:
            self._unet.set_attn_processor(self._saved)
        self._saved, self._unet = None, None
        self.keyframe_tokens.clear()

    def __enter__(self) -> "TokenFlowRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _heads(x: Tensor, heads: int) -> Tensor:
    return rearrange(x, "n s (h d) -> n h s d", h=heads)


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
        if step.phase == "propagate":
            out = self._propagate(attn, x, step, src)
        else:
            q, k, v = self.runtime.editor.self_attention(self.name, *self._qkv(attn, x), step)
            joint = [b.joint and step.phase == "keyframes" for b in step.branches]
            out = torch.stack([self._attend(attn, q[i:i+1], k[i:i+1], v[i:i+1], joint[i])[0] for i in range(n_branches)])
            if step.phase == "keyframes":  # keep only what propagation will read
                propagator = self.runtime.propagator
                keep = [i for i in range(n_branches) if not (i == src and propagator.source_features == "clean")]
                source = x[src] if src is not None and propagator.needs_source else None
                self.runtime.keyframe_tokens[self.name] = KeyframeTokens(source, out[keep])
        return rearrange(out, "b f s c -> (b f) s c")

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
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def _propagate(self, attn, x: Tensor, step: Step, src: int | None) -> Tensor:
        """Outputs of every branch for the frames of a propagate-phase call, x (B, F, S, C)."""
        stored = self.runtime.keyframe_tokens.get(self.name)
        propagator = self.runtime.propagator
        if stored is None:
            raise RuntimeError(f"{self.name}: propagation needs the keyframe pass first")
        if propagator.needs_source and (src is None or stored.source is None):
            raise RuntimeError(f"{self.name}: {type(propagator).__name__} needs the source branch in the UNet batch")
        # the source branch's own attention is computed per frame in `clean` mode, else propagated too
        compute_source = src is not None and propagator.source_features == "clean"
        moved = [i for i in range(x.shape[0]) if not (compute_source and i == src)]
        query = PropagationQuery(
            layer=self.name, grid=token_grid(self.runtime.latent_hw, x.shape[2]), timestep=step.timestep,
            frames=step.frames, keyframes=step.keyframes, keyframe_outputs=stored.outputs,
            source=x[src] if propagator.needs_source else None,
            keyframe_source=stored.source if propagator.needs_source else None, on_match=self.runtime.on_match)
        propagated = propagator.propagate(query)
        if not compute_source:
            return propagated
        out = propagated.new_empty(x.shape[0], *propagated.shape[1:])
        out[moved] = propagated
        out[src] = self._attend(attn, *self._qkv(attn, x[src : src + 1]), joint=False)[0]  # the unmodified source
        return out
