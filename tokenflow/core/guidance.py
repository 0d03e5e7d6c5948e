"""Classifier-free guidance shared by tokenflow.editors: a negative (or null-text) branch and a target branch."""
from __future__ import annotations

from torch import Tensor

from tokenflow.core.editor import Branch, EditInputs, KeyframeEditor, Step
from tokenflow.core.nulltext import UnconditionalEmbedding


class GuidedEditor(KeyframeEditor):
    """Branches ``uncond`` and ``cond`` with CFG weight ``self.config.guidance_scale``.

    ``uncond`` is the negative prompt, or the inversion's null-text embeddings when it has them and
    the negative prompt is empty.
    """

    config: object

    def prepare(self, inputs: EditInputs) -> None:
        self._uncond = UnconditionalEmbedding(inputs)
        self._cond = inputs.model.encode_text(inputs.prompt)

    def branches(self, step: Step) -> list[Branch]:
        return [Branch("uncond", self._uncond.at(step.timestep)), Branch("cond", self._cond)]

    def guide(self, eps: dict[str, Tensor], step: Step) -> Tensor:
        g = self.config.guidance_scale
        return eps["uncond"] + g * (eps["cond"] - eps["uncond"])
