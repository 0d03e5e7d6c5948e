"""The inversion of a video: the latent of every frame at every kept timestep (a data type, no computation)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from tokenflow.errors import ConfigError


@dataclass
class NullTextEmbeddings:
    """Null-text inversion's optimised unconditional embeddings (Mokady et al. 2023), one per frame and step.

    table: (T, N, L, D) float32, ``table[i]`` for the inversion's ``timesteps[i]``. guidance_scale: the
    classifier-free guidance weight they were optimised for (sampling at another weight drifts).
    pooled: (1, P) the empty prompt's pooled embedding for SDXL (held fixed), else None.
    """

    table: Tensor
    guidance_scale: float
    pooled: Tensor | None = None


@dataclass
class InversionResult:
    """Latents of every frame at every kept timestep.

    timesteps: kept timesteps, noisiest first (e.g. 981, ..., 1, optionally 999 in front).
    latents: (T, N, 4, h, w) float32 on CPU, ``latents[i]`` at ``timesteps[i]``.
    clean: (N, 4, h, w) the encoded frames z0.
    null_text: the null-text embeddings when the inverter optimised them (editors then use them as the
    unconditional branch), else None.
    extras: further per-timestep tensors a custom inverter adds, name → (T, ...).
    """

    timesteps: list[int]
    latents: Tensor
    clean: Tensor
    prompt: str
    settings: dict[str, Any]
    null_text: NullTextEmbeddings | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def at(self, t: int, frames: Tensor | list[int] | None = None) -> Tensor:
        """Latents at timestep ``t`` (N, 4, h, w), optionally only ``frames``."""
        try:
            i = self.timesteps.index(int(t))
        except ValueError:
            raise ConfigError(
                f"the inversion holds no latent at t={int(t)} (it kept {len(self.timesteps)} timesteps "
                f"{self.timesteps[0]}..{self.timesteps[-1]}) — invert with keep_steps equal to the editor's n_steps") from None
        x = self.latents[i]
        return x if frames is None else x[frames]

    def has(self, t: int) -> bool:
        return int(t) in self.timesteps

    @property
    def n_frames(self) -> int:
        return self.clean.shape[0]
