"""Prompt-to-Prompt (Hertz et al., 2023) as a TokenFlow keyframe editor.

Branches of every UNet call, in order:

* ``source`` (:data:`tokenflow.core.editor.SOURCE`): the inverted source latents at t with the *source
  prompt* (``source_prompt``, default the inversion prompt), per-frame attention. It is P2P's source
  generation — the DDIM reconstruction path, since it follows the inversion instead of being stepped —
  and also the branch TokenFlow reads correspondences from, so the pipeline adds no second one.
  The source's own CFG prediction is never used, hence no source-uncond branch.
* ``uncond`` (only when ``guidance_scale != 1``): edited latents, negative prompt — or, when the
  inversion is a null-text inversion (``InversionResult.null_text``; the negative prompt must then be empty),
  the per-frame null embeddings at t (:class:`tokenflow.core.nulltext.UnconditionalEmbedding`).
* ``cond``: edited latents, target prompt. Only this branch is controlled (P2P edits the conditional half).

Cross-attention (``attn2``) of ``cond`` takes the source's maps (word swap / refinement, optional
reweighting) for the first ``cross_replace_steps``; see :mod:`tokenflow.editors.p2p_control`. Self-attention
replacement (first ``self_replace_steps``, layers at ≤ 1/4 of the latent's side, i.e. ≤ 16x16 at 512 px)
runs through the ``self_attention`` hook, *inside* TokenFlow's processors: ``cond`` gets the source's
queries and keys, so its attention map is the source's (P2P's replacement, exactly, for per-frame
attention; over all keyframes' source keys in the joint keyframe pass) while values stay its own. It
happens before extended attention, before the keyframe outputs are stored, and so before propagation;
propagated frames inherit it from the keyframes. ``mode=reweight`` scales the target's own maps (no
injection); an ``equalizer`` with replace/refine scales the injected maps (P2P's chained AttentionReweight).

LocalBlend (``blend_words``) keeps the source latents outside the words' mask after every DDIM step. The
mask comes from the current UNet call's maps (not P2P's running sum over steps) at the non-mid
cross-attention layers two downsamplings below the latent — P2P's ``down_cross[2:4] + up_cross[:3]``
(16x16) for SD at 512 px; chosen by UNet structure (``UNetLayout.level``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from enum import Enum

from tokenflow.core.editor import SOURCE, Branch, EditInputs, KeyframeEditor, Step
from tokenflow.core.guidance import UnconditionalEmbedding, cfg
from tokenflow.editors.p2p_align import equalizer, refinement_mapper, replacement_mapper, word_positions
from tokenflow.editors.p2p_control import CrossAttentionEdit, LocalBlend, install_cross_attention
from tokenflow.errors import ConfigError
from tokenflow.options import choice, configured, fraction, non_negative


class Mode(str, Enum):
    replace = "replace"     # word swap: prompts of equal token count
    refine = "refine"       # words added/changed, tokens aligned
    reweight = "reweight"   # no map injection, only the equalizer

TARGET = "cond"   # the controlled branch
LEVEL = 2         # P2P's 16x16 layers at 512 px: two 2x downsamplings below the latent (64x64)


@dataclass
class PromptToPromptConfig:
    mode: Mode = Mode.replace              # replace (word swap) | refine (added words) | reweight (equalizer only)
    source_prompt: str | None = None       # P2P's source prompt; None = the inversion prompt
    guidance_scale: float = 7.5            # classifier-free guidance on the target branches
    cross_replace_steps: float = 0.8       # fraction of steps with cross-attention control
    self_replace_steps: float = 0.4        # fraction of steps with self-attention map replacement
    equalizer: dict[str, float] = field(default_factory=dict)   # word of the target prompt -> attention scale
    blend_words: list[str] = field(default_factory=list)        # LocalBlend words (either prompt); empty = off
    blend_threshold: float = 0.3           # LocalBlend mask threshold on the normalised word maps

    def __post_init__(self) -> None:
        self.mode = choice(Mode, self.mode, "editor.mode")
        self.cross_replace_steps = fraction(self.cross_replace_steps, "editor.cross_replace_steps")
        self.self_replace_steps = fraction(self.self_replace_steps, "editor.self_replace_steps")
        self.guidance_scale = non_negative(self.guidance_scale, "editor.guidance_scale")
        if not 0.0 <= self.blend_threshold < 1.0:
            raise ConfigError(f"editor.blend_threshold={self.blend_threshold} must be in [0, 1) — 0.3 is the usual value")
        for word, scale in self.equalizer.items():
            if not (math.isfinite(scale) and scale >= 0):
                raise ConfigError(f"editor.equalizer[{word!r}]={scale} must be a finite number >= 0 — e.g. 2 to strengthen")
        if self.mode == "reweight" and not self.equalizer:
            raise ConfigError("editor.mode=reweight with an empty equalizer does nothing — set e.g. equalizer={cat: 2}")


@configured
class PromptToPromptEditor(KeyframeEditor):
    """Prompt-to-Prompt cross-attention control (word swap, refinement, reweighting, LocalBlend), with CFG."""

    needs_source = True
    families = ("unet",)  # controls the UNet's cross-attention maps
    Config = PromptToPromptConfig

    def __init__(self, **config) -> None:
        self.config = PromptToPromptConfig(**config)
        self._embeddings: dict[str, Tensor] = {}
        self._uncond: UnconditionalEmbedding | None = None
        self._inversion = None
        self._timesteps: list[int] = []
        self._edit: CrossAttentionEdit | None = None
        self._blend_positions: tuple[list[int], list[int]] | None = None
        self._blend: LocalBlend | None = None
        self._self_layers: frozenset[str] = frozenset()

    # ---- set-up ----------------------------------------------------------------------------------
    def prepare(self, inputs: EditInputs) -> None:
        c, model = self.config, inputs.model
        tok = model.tokenizer
        source = inputs.inversion_prompt if c.source_prompt is None else c.source_prompt
        length = tok.model_max_length
        if c.mode == "replace":
            mapper, inject = replacement_mapper(tok, source, inputs.prompt), torch.ones(length)
        elif c.mode == "refine":
            mapper = refinement_mapper(tok, source, inputs.prompt)
            inject = (mapper >= 0).float()
        else:
            mapper, inject = torch.arange(length), torch.zeros(length)
        self._edit = CrossAttentionEdit(mapper, inject, equalizer(tok, inputs.prompt, c.equalizer), c.cross_replace_steps)
        self._blend_positions = self._word_positions(tok, source, inputs.prompt) if c.blend_words else None
        self._embeddings = {SOURCE: model.encode_text(source), TARGET: model.encode_text(inputs.prompt)}
        self._uncond = UnconditionalEmbedding(inputs, c.guidance_scale) if c.guidance_scale != 1 else None
        self._inversion, self._timesteps = inputs.inversion, list(inputs.grid)

    def _word_positions(self, tok, source: str, target: str) -> tuple[list[int], list[int]]:
        src, tgt = [], []
        for word in self.config.blend_words:
            s, t = word_positions(tok, source, word, required=False), word_positions(tok, target, word, required=False)
            if not s and not t:
                raise ConfigError(f"editor.blend_words: {word!r} occurs in neither {source!r} nor {target!r} — "
                                  "use words of the prompts")
            src, tgt = src + s, tgt + t
        return src, tgt

    def install(self, unet: torch.nn.Module, layout, step_ref) -> list:
        if self._edit is None:
            raise RuntimeError("PromptToPromptEditor.install before prepare")
        inner = [n for n in layout.cross_attention if not n.startswith("mid_block.")]
        level = min(LEVEL, max(layout.level[n] for n in inner))
        self._self_layers = frozenset(n for n in layout.self_attention if layout.level[n] >= level)
        self._blend = None
        if self._blend_positions is not None:
            self._blend = LocalBlend(*self._blend_positions, frozenset(n for n in inner if layout.level[n] == level),
                                     level, self.config.blend_threshold)
        return [install_cross_attention(unet, layout.cross_attention, self._edit, self._blend, step_ref, TARGET)]

    # ---- per step --------------------------------------------------------------------------------
    def branches(self, step: Step) -> list[Branch]:
        out = [Branch(SOURCE, self._embeddings[SOURCE], latents="source", joint=False)]
        if self._uncond is not None:
            out.append(Branch("uncond", self._uncond.at(step.timestep)))
        return out + [Branch(TARGET, self._embeddings[TARGET])]

    def branch_count(self, model, source: bool) -> int:
        return 2 + int(self.config.guidance_scale != 1)  # its own source branch, uncond, target

    @property
    def guidance_weight(self) -> float:
        return self.config.guidance_scale

    def guide(self, eps: dict[str, Tensor], step: Step) -> Tensor:
        return cfg(eps, self.config.guidance_scale, cond=TARGET)

    def self_attention(self, layer: str, q: Tensor, k: Tensor, v: Tensor, step: Step):
        src, tgt = step.index_of(SOURCE), step.index_of(TARGET)
        if layer not in self._self_layers or src is None or tgt is None or not step.within(self.config.self_replace_steps):
            return q, k, v
        q2, k2 = q.clone(), k.clone()
        q2[tgt], k2[tgt] = q[src], k[src]
        return q2, k2, v

    def step_end(self, latents: Tensor, step: Step) -> Tensor:
        """LocalBlend: ``x_src + mask·(x − x_src)``, x_src the source latents at the next timestep (F, 4, h, w)."""
        if self._blend is None:
            return latents
        mask = self._blend.mask(step, tuple(latents.shape[-2:])).to(latents)
        frames = step.frames.cpu()
        nxt = step.index + 1
        source = self._inversion.at(self._timesteps[nxt], frames) if nxt < len(self._timesteps) \
            else self._inversion.clean[frames]
        source = source.to(latents)
        return source + mask * (latents - source)
