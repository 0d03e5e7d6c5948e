"""SDEdit (Meng et al., 2022) as a TokenFlow keyframe editor: re-noise the input part-way, denoise to the prompt.

**Start.** With an n-step grid (noisiest first) and ``strength`` s the edit runs the last
k = round(s·n) steps, ``timesteps[n - k:]`` (``start_slicing="exact"``): s = 1.0 runs all n steps
from t=981 (50 steps), s = 0.9 runs 45 steps from t=881, s = 0 runs none and returns the input
latents z0 unchanged. The official ``run_tokenflow_sdedit.py`` slices ``timesteps[int(1 - s·n):]``,
one step short: 44 steps from t=861 for 0.9, and 49 steps for 1.0 (t=981 dropped);
``start_slicing="reference"`` reproduces that slice exactly (including its quirks at small s:
``int(1 - s·n)`` is 1 for s = 0, i.e. 49 steps, and 0 for s·n < 1, i.e. all steps).

**Noise.** x_start = √ᾱ·z0 + √(1-ᾱ)·ε at the first edited timestep. ``noise="inversion"``: ε is the
noise for which the noisiest kept inverted latent equals ``add_noise(z0, ε, t_noisiest)`` (the official
``get_ddim_eps``). ``noise="random"``: ε from a generator seeded with ``seed`` (the run's seed from the CLI), one draw
shared by all frames (what the official ``use_ddim_noise: False`` branch meant to do; it crashes there).

**Branches.** ``uncond`` (negative prompt, or the null-text embeddings of a null-text inversion when
the negative prompt is empty) and ``cond`` (target prompt), classifier-free guidance. SDEdit injects
nothing (``needs_source = False``), but ``TokenFlowPropagator`` needs source features for its
correspondences, so the pipeline then carries a third branch, the inverted source latents with the
inversion prompt: 3·(K + N) image-UNet evaluations per step for N frames and K keyframes, against
2·(K + N) without it (+50 %) and 2·N per step for ``NoPropagation`` (tests/test_sdedit.py counts them);
a propagator that needs no source tokens (``FlowPropagator``) needs no source branch either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from enum import Enum

from tokenflow.core.editor import EditInputs
from tokenflow.core.guidance import GuidedEditor
from tokenflow.options import choice, configured, fraction, non_negative
from tokenflow.rng import seeded


class Noise(str, Enum):
    inversion = "inversion"   # ε solved from the noisiest inverted latent (official use_ddim_noise: True)
    random = "random"         # fresh ε from ``seed``, shared by all frames


class Slicing(str, Enum):
    exact = "exact"           # the last round(strength·n) steps
    reference = "reference"   # the official timesteps[int(1 - strength·n):], one step short


@dataclass
class SDEditConfig:
    strength: float = 0.9          # fraction of the grid denoised: runs the last round(strength·n) steps
    guidance_scale: float = 7.5    # classifier-free guidance weight
    noise: Noise = Noise.inversion          # where the re-noising ε comes from
    seed: int = 0                           # generator seed for noise="random" (the CLI passes the run's seed)
    start_slicing: Slicing = Slicing.exact  # exact | reference

    def __post_init__(self) -> None:
        self.strength = fraction(self.strength, "editor.strength", "the fraction of the denoising steps run, e.g. 0.9")
        self.guidance_scale = non_negative(self.guidance_scale, "editor.guidance_scale")
        self.noise = choice(Noise, self.noise, "editor.noise")
        self.start_slicing = choice(Slicing, self.start_slicing, "editor.start_slicing")


def start_index(strength: float, n: int, slicing: str = "exact") -> int:
    """Index into an n-step grid (noisiest first) where SDEdit starts; ``n`` means no steps."""
    if slicing == "reference":  # Python slice semantics of timesteps[int(1 - strength * n):]
        m = int(1 - strength * n)
        return max(n + m, 0) if m < 0 else min(m, n)
    return n - math.floor(strength * n + 0.5)


@configured
class SDEditEditor(GuidedEditor):
    """SDEdit: start from re-noised input latents part-way down the grid, CFG towards the prompt."""

    needs_source = False
    Config = SDEditConfig

    def __init__(self, **config) -> None:
        self.config = SDEditConfig(**config)

    def timesteps(self, grid: list[int]) -> list[int]:
        return grid[start_index(self.config.strength, len(grid), self.config.start_slicing):]

    def noise(self, inputs: EditInputs) -> Tensor:
        """ε (N, C, h, w), float32 on CPU, used to re-noise the input latents."""
        inv, z0 = inputs.inversion, inputs.inversion.clean.float()
        if self.config.noise == "inversion":
            t = inv.timesteps[0]
            return inputs.sampler.noise_from_latent(z0, inv.at(t).float(), inputs.sampler.level(t))
        return torch.randn((1, *z0.shape[1:]), generator=seeded(self.config.seed)).expand_as(z0).clone()

    def initial_latents(self, inputs: EditInputs, timesteps: list[int]) -> Tensor:
        """z0 re-noised to ``timesteps[0]`` (N, C, h, w); z0 itself when there are no steps."""
        z0 = inputs.inversion.clean.float()
        if not timesteps:
            return z0.clone()
        return inputs.sampler.add_noise(z0, self.noise(inputs), inputs.sampler.level(timesteps[0]))
