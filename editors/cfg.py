"""Plain classifier-free guidance as a keyframe editor: sampling from the inverted latents with the edit prompt,
no injection (the ``editor=cfg`` baseline, and the ``base`` a ControlNet can steer)."""
from __future__ import annotations

from dataclasses import dataclass

from tokenflow.core.guidance import GuidedEditor
from tokenflow.options import non_negative


@dataclass
class CFGConfig:
    guidance_scale: float = 7.5   # classifier-free guidance weight (on FLUX.1-dev: its guidance input)

    def __post_init__(self) -> None:
        self.guidance_scale = non_negative(self.guidance_scale, "editor.guidance_scale")


class CFGEditor(GuidedEditor):
    """Classifier-free guidance only: what the edit prompt alone does from the inverted latents."""

    Config = CFGConfig

    def __init__(self, guidance_scale: float = 7.5) -> None:
        self.config = CFGConfig(guidance_scale)
