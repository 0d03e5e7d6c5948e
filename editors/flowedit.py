"""FlowEdit (Kulikovsky et al., 2024, arXiv 2412.08629): inversion-free editing on a flow-matching model, as a keyframe editor.

No inversion. On the n-step grid σ_0 > ... > σ_{n-1} (> σ_n = 0) the edit runs the last ``n_max`` steps, from
Z_edit = X0 (the encoded frames). At each step σ → σ' of the first ``n_max - n_min`` of them, with noise ε:

    Z_src = (1 - σ)·X0 + σ·ε,    Z_tar = Z_edit + Z_src - X0,
    Z_edit ← Z_edit + (σ' - σ)·[V(Z_tar, c_tar) - V(Z_src, c_src)]

(the bracket averaged over ``n_avg`` noise draws); V is the guided velocity: classifier-free guidance with
``src_guidance_scale`` / ``tar_guidance_scale`` on SD 3, the guidance *input* of FLUX.1-dev with those
values (one forward per prompt). The last ``n_min`` steps are plain sampling towards the target prompt
from Z_tar = Z_edit + Z_src - X0 (Z_src with a fresh draw at that step's σ). The result is Z_edit (or
the sampled latents when ``n_min > 0``). ``n_max`` larger than the grid edits every step, as the published
code does.

**Noise.** Draws come from a generator seeded with ``seed``, in the published code's order: at each
FlowEdit step ``n_avg`` draws, one at the first plain step, none after. ``shared_noise=True`` (default):
one draw per step shared by every frame of the video — per-frame noise would make the source branch's
tokens of neighbouring frames differ by the noise, not by the video, and weaken the nearest-neighbour
fields TokenFlow reads from them; ``shared_noise=False`` draws per frame (an ablation). A script may set
:attr:`FlowEditEditor.noise_source` to supply the draws itself.

**With TokenFlow.** The target branches (``cond``, and ``tar_uncond`` under CFG) are joint: their keyframes
are edited with extended attention and their tokens propagated. The source branches (``source``: the
source prompt at Z_src, and ``src_uncond``) attend per frame in every phase; ``source`` supplies the
nearest-neighbour features. Nothing is written to disk: there is no trajectory.

Per step and frame this costs 2 transformer evaluations (FLUX; SD 3 at guidance 1), 4 with CFG on both
(SD 3's published 3.5 / 13.5), times ``n_avg``; plain steps 1 (2 with CFG), plus the source branch for
TokenFlow's features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tokenflow.core.editor import SOURCE, Branch, EditInputs, KeyframeEditor, Step
from tokenflow.core.guidance import cfg
from tokenflow.errors import ConfigError
from tokenflow.rng import seeded
from tokenflow.options import configured

@dataclass
class FlowEditConfig:
    n_max: int = 33                  # the edit runs the last n_max steps of the grid (all of them when larger)
    n_min: int = 0                   # of which the last n_min are plain sampling towards the target
    n_avg: int = 1                   # noise draws averaged per step
    src_guidance_scale: float = 3.5  # guidance of the source velocity (CFG on SD 3, the guidance input on FLUX-dev)
    tar_guidance_scale: float = 13.5 # guidance of the target velocity
    seed: int = 0                    # generator seed of the noise draws (the CLI passes the run's seed)
    shared_noise: bool = True        # one draw per step shared by all frames (false: per frame, an ablation)

    def __post_init__(self) -> None:
        for name in ("n_max", "n_avg"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"editor.{name}={getattr(self, name)} must be >= 1 — FlowEdit's published values are "
                                  "n_max=33 (SD 3, 50 steps) or 24 (FLUX, 28 steps) and n_avg=1")
        if not 0 <= int(self.n_min) <= int(self.n_max):
            raise ConfigError(f"editor.n_min={self.n_min} must be in [0, n_max={self.n_max}] — it counts the last "
                              "edited steps run as plain sampling; 0 is the published value")
        for name in ("src_guidance_scale", "tar_guidance_scale"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"editor.{name}={value} must be a finite number >= 0 — SD 3: 3.5 / 13.5, FLUX: 1.5 / 5.5")


@configured
class FlowEditEditor(KeyframeEditor):
    """FlowEdit keyframes; see the module docstring."""

    needs_source = False      # its own source branch while editing; the pipeline adds one for TokenFlow after
    needs_inversion = False   # inversion-free
    families = ("mmdit",)
    samplers = ("flow_match_euler",)
    Config = FlowEditConfig

    #: (step index, draw index, shape) → noise (float32, CPU); None: the seeded generator
    noise_source: Optional[Callable[[int, int, tuple[int, ...]], Tensor]] = None

    def __init__(self, **config) -> None:
        self.config = FlowEditConfig(**config)

    # ---- set-up ----------------------------------------------------------------------------------
    def prepare(self, inputs: EditInputs) -> None:
        model, c = inputs.model, self.config
        self.sampler = inputs.sampler
        self._x0 = inputs.inversion.clean.float()
        self._classifier_free = bool(getattr(model, "classifier_free", True))
        embedded = bool(getattr(model, "guidance_embedded", False))
        self._g_src = float(c.src_guidance_scale) if embedded else None
        self._g_tar = float(c.tar_guidance_scale) if embedded else None
        self._cfg_src = self._classifier_free and float(c.src_guidance_scale) != 1.0
        self._cfg_tar = self._classifier_free and float(c.tar_guidance_scale) != 1.0
        self._src = model.encode_text(inputs.inversion_prompt)
        self._tar = model.encode_text(inputs.prompt)
        self._neg = model.encode_text(inputs.negative_prompt) if (self._cfg_src or self._cfg_tar) else None
        self._n = min(int(c.n_max), len(inputs.grid))
        self._switch = self._n - int(c.n_min)  # first plain-sampling step (index into the edit's steps)
        self._generator = seeded(c.seed)
        self._noise_at: tuple[int, list[Tensor]] | None = None

    def timesteps(self, grid: list) -> list:
        return grid[len(grid) - min(int(self.config.n_max), len(grid)):]

    def initial_latents(self, inputs: EditInputs, timesteps: list) -> Tensor:
        return inputs.inversion.clean.float().clone()

    def source_settings(self) -> dict[str, Any]:
        c = self.config
        return {"seed": c.seed, "shared_noise": c.shared_noise, "n_max": c.n_max, "n_min": c.n_min, "n_avg": c.n_avg,
                "src_guidance_scale": c.src_guidance_scale}

    @property
    def guidance_weight(self) -> float | None:
        return float(self.config.tar_guidance_scale)

    # ---- the noise and the two latents -----------------------------------------------------------
    def _draws(self, index: int) -> list[Tensor]:
        """The noise draws of edit step ``index`` (n_avg while editing, one at the first plain step; later plain
        steps reuse that one — only the source branch's features read them), each (1 or N, C, h, w) on CPU."""
        index = min(index, self._switch)
        if self._noise_at is None or self._noise_at[0] != index:
            count = int(self.config.n_avg) if index < self._switch else 1
            shape = (1 if self.config.shared_noise else self._x0.shape[0], *self._x0.shape[1:])
            draw = self.noise_source or (lambda i, k, s: torch.randn(s, generator=self._generator))
            self._noise_at = (index, [draw(index, k, shape).float().cpu() for k in range(count)])
        return self._noise_at[1]

    def z_src(self, x: Tensor, step: Step, k: int = 0) -> Tensor:
        """Z_src = (1 - σ)·X0 + σ·ε_k for the call's frames (F, C, h, w), on ``x``'s device."""
        eps = self._draws(step.index)[k]
        eps = eps.expand(len(step.frames), *eps.shape[1:]) if eps.shape[0] == 1 else eps[step.frames.cpu()]
        x0 = self._x0[step.frames.cpu()]
        return self.sampler.add_noise(x0, eps, self.sampler.level(step.timestep)).to(x)

    def z_tar(self, x: Tensor, step: Step, k: int = 0) -> Tensor:
        """Z_tar = Z_edit + Z_src - X0 for the call's frames."""
        return x + self.z_src(x, step, k) - self._x0[step.frames.cpu()].to(x)

    # ---- the steps -------------------------------------------------------------------------------
    def branches(self, step: Step) -> list[Branch]:
        if step.index >= self._switch:  # plain sampling from Z_tar (entered at the switch step)
            make = (lambda x, s: self.z_tar(x, s)) if step.index == self._switch else None
            out = [Branch("cond", self._tar, make_latents=make, guidance=self._g_tar)]
            return ([Branch("tar_uncond", self._neg, make_latents=make)] if self._cfg_tar else []) + out
        out: list[Branch] = []
        for k in range(int(self.config.n_avg)):
            src = lambda x, s, k=k: self.z_src(x, s, k)  # noqa: E731
            tar = lambda x, s, k=k: self.z_tar(x, s, k)  # noqa: E731
            tag = "" if k == 0 else f"_{k}"
            out.append(Branch(SOURCE + tag, self._src, latents="source", joint=False, make_latents=src,
                              guidance=self._g_src))
            if self._cfg_src:
                out.append(Branch("src_uncond" + tag, self._neg, latents="source", joint=False, make_latents=src))
            if self._cfg_tar:
                out.append(Branch("tar_uncond" + tag, self._neg, make_latents=tar))
            out.append(Branch("cond" + tag, self._tar, make_latents=tar, guidance=self._g_tar))
        return out

    def branch_count(self, model, source: bool) -> int:
        """Per noise draw: the source and target velocities, each doubled by CFG on a classifier-free model (its
        own source velocity serves TokenFlow: ``source`` adds nothing)."""
        cfg_on = getattr(model, "classifier_free", True)
        c = self.config
        per_draw = 2 + int(cfg_on and float(c.src_guidance_scale) != 1.0) + int(cfg_on and float(c.tar_guidance_scale) != 1.0)
        return int(c.n_avg) * per_draw

    def source_branch(self, branch: Branch) -> Branch:
        """The pipeline's source branch (for TokenFlow's features in the plain steps): the source prompt at Z_src."""
        return replace(branch, make_latents=lambda x, s: self.z_src(x, s), guidance=self._g_src)

    def guide(self, v: dict[str, Tensor], step: Step) -> Tensor:
        c = self.config
        if step.index >= self._switch:
            return cfg(v, c.tar_guidance_scale, "tar_uncond", "cond")
        deltas = []
        for k in range(int(c.n_avg)):
            tag = "" if k == 0 else f"_{k}"
            target = cfg(v, c.tar_guidance_scale, "tar_uncond" + tag, "cond" + tag)
            source = cfg(v, c.src_guidance_scale, "src_uncond" + tag, SOURCE + tag)
            deltas.append(target - source)
        return deltas[0] if len(deltas) == 1 else sum(d / len(deltas) for d in deltas)

    def step_end(self, latents: Tensor, step: Step) -> Tensor:
        """At the first plain step the carried latents become the target's: Z_tar + (σ' - σ)·V = Z_edit' + Z_src - X0."""
        if step.index != self._switch:
            return latents
        return latents + self.z_src(latents, step) - self._x0[step.frames.cpu()].to(latents)
