"""Classifier-free guidance as core concepts: the unconditional embedding, and a CFG editor base class.

The unconditional branch is either the negative prompt or, for a null-text inversion, its optimised
per-frame, per-step embeddings (``InversionResult.null_text``): the link from inverter to editor is that
typed field. A new editor subclasses :class:`GuidedEditor` (or uses :class:`UnconditionalEmbedding`)
and imports from ``tokenflow`` only.
"""
from __future__ import annotations

import logging
from typing import Protocol

from torch import Tensor

from tokenflow.core.editor import Branch, EditInputs, KeyframeEditor, Step
from tokenflow.core.numerics import check_finite_setting
from tokenflow.errors import ConfigError
from tokenflow.models.backbone import TextEmbedding

log = logging.getLogger(__name__)


class UnconditionalEmbedding:
    """The unconditional branch's embedding at each timestep of an edit.

    With a null-text inversion: that frame's optimised null embedding at the timestep, a per-frame
    (N, L, D) embedding; a non-empty negative prompt cannot be used with it (one clear error says so).
    Otherwise the negative prompt's embedding (1, L, D), the same at every step. ``guidance_scale`` is
    the weight the editor guides with: a null-text table fitted for another weight is used with a warning.
    The embeddings were fitted along the reconstruction from the noisiest inverted latent; an edit that
    starts elsewhere (SDEdit below strength 1) uses them as an approximation.
    """

    def __init__(self, inputs: EditInputs, guidance_scale: float) -> None:
        self.model = inputs.model
        self.null_text = inputs.inversion.null_text
        self.timesteps = list(inputs.inversion.timesteps)
        if self.null_text is not None:
            if inputs.negative_prompt:
                raise ConfigError(f"negative_prompt={inputs.negative_prompt!r} cannot be used with a null-text inversion: "
                                  "its optimised embeddings are the unconditional branch — set negative_prompt='' "
                                  "(or invert with inverter=ddim to guide away from a negative prompt)")
            if abs(self.null_text.guidance_scale - guidance_scale) > 1e-6:
                log.warning("the null-text embeddings were optimised for guidance %.2f but the editor guides with %.2f: "
                            "the reconstruction drifts — set inverter.guidance_scale to the editor's",
                            self.null_text.guidance_scale, guidance_scale)
            self.negative = None
        else:
            self.negative = inputs.model.encode_text(inputs.negative_prompt)
        self._last: tuple[int, TextEmbedding] | None = None

    def at(self, t: int) -> TextEmbedding:
        """(1, L, D) negative-prompt embedding, or the (N, L, D) null-text embeddings at timestep t."""
        if self.null_text is None:
            return self.negative  # type: ignore[return-value]
        if self._last is None or self._last[0] != t:
            if t not in self.timesteps:
                raise ConfigError(f"the null-text inversion has no embedding at t={t} — invert with the editing "
                                  f"grid (inverter.n_steps = n_steps)")
            table = self.null_text.step(self.timesteps.index(t)).to(self.model.device, self.model.dtype)  # one step read
            pooled = self.null_text.pooled
            if pooled is not None:
                pooled = pooled.to(self.model.device, self.model.dtype)
            self._last = (t, TextEmbedding(table, pooled))
        return self._last[1]


class GuidanceSettings(Protocol):
    """What :class:`GuidedEditor` reads of its editor's ``config``: the guidance weight."""

    guidance_scale: float


class GuidedEditor(KeyframeEditor):
    """Branches ``uncond`` and ``cond`` with classifier-free guidance weight :attr:`guidance_scale`.

    ``uncond`` is the negative prompt, or the inversion's null-text embeddings (see
    :class:`UnconditionalEmbedding`); at guidance 1 it is not run at all. A subclass sets ``config`` to its
    settings dataclass, which has a ``guidance_scale`` field (:class:`GuidanceSettings`), or overrides
    :attr:`guidance_scale`.

    On a model that is not guided classifier-free (``model.classifier_free`` False: FLUX.1) there is one
    branch, ``cond``, and the weight is the model's guidance *input* where it has one (FLUX.1-dev: the
    branch's ``guidance``; FLUX.1-schnell reads none, and the weight is then unused).
    """

    config: GuidanceSettings
    _classifier_free: bool = True
    _guidance_input: bool = False

    @property
    def guidance_scale(self) -> float:
        return check_finite_setting(self.config.guidance_scale, "editor.guidance_scale")

    @property
    def guidance_weight(self) -> float | None:
        return self.guidance_scale

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch is needed (classifier-free guidance with a weight other than 1)."""
        return self._classifier_free and self.guidance_scale != 1.0

    def prepare(self, inputs: EditInputs) -> None:
        self._classifier_free = bool(getattr(inputs.model, "classifier_free", True))
        self._guidance_input = bool(getattr(inputs.model, "guidance_embedded", False))
        self._uncond = UnconditionalEmbedding(inputs, self.guidance_scale) if self.guided else None
        self._cond = inputs.model.encode_text(inputs.prompt)

    def branches(self, step: Step) -> list[Branch]:
        cond = Branch("cond", self._cond, guidance=self.guidance_scale if self._guidance_input else None)
        return [Branch("uncond", self._uncond.at(step.timestep)), cond] if self._uncond is not None else [cond]

    def guide(self, eps: dict[str, Tensor], step: Step) -> Tensor:
        return cfg(eps, self.guidance_scale)

    def branch_count(self, model, source: bool) -> int:
        guided = getattr(model, "classifier_free", True) and self.guidance_scale != 1.0
        return (2 if guided else 1) + int(source)


def cfg(eps: dict[str, Tensor], guidance_scale: float, uncond: str = "uncond", cond: str = "cond") -> Tensor:
    """ε_u + w·(ε_c − ε_u), or ε_c when there is no unconditional branch."""
    if uncond not in eps:
        return eps[cond]
    return eps[uncond] + guidance_scale * (eps[cond] - eps[uncond])
