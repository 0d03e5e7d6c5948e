"""Inversion of video frames to noise: the ``Inverter`` interface and DDIM inversion.

An inversion keeps, for every frame, the latent at each timestep the editor will visit, so PnP's
source branch and TokenFlow's correspondences can read the source video at any editing step.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenflow.models.ddim import alpha_bar, ddim_step, ddim_timesteps, previous_timestep
from tokenflow.errors import ConfigError
from tokenflow.models.trajectory import InversionResult


class Inverter(ABC):
    """Maps clean latents z0 to the noisy latents along a sampling trajectory."""

    @abstractmethod
    def invert(self, model, clean: Tensor, prompt: str, progress: bool = True) -> InversionResult:
        """clean: (N, 4, h, w) latents of the frames → an :class:`InversionResult`."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes the result; part of the inversion cache key."""

    def kept_timesteps(self, scheduler) -> list[int]:
        """Timesteps this inverter keeps, noisiest first."""
        raise NotImplementedError


@dataclass
class DDIMInverterConfig:
    n_steps: int = 50          # inversion steps (the official code uses 500)
    keep_steps: int = 50       # keep the latents on the n-step DDIM grid the editor samples on
    keep_final: bool = False   # also keep the last inverted latent (t = 999 for 500 steps), as the official code
    batch_size: int = 8        # frames per UNet call

    def __post_init__(self) -> None:
        for name in ("n_steps", "keep_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inverter.{name}={getattr(self, name)} must be >= 1 — use a positive number")
        if self.keep_steps > self.n_steps:
            raise ConfigError(f"inverter.keep_steps={self.keep_steps} exceeds n_steps={self.n_steps} — "
                              "invert with at least as many steps as the editor samples")


class DDIMInverter(Inverter):
    """Deterministic DDIM inversion conditioned on the inversion prompt, without guidance."""

    Config = DDIMInverterConfig

    def __init__(self, **config: Any) -> None:
        self.config = DDIMInverterConfig(**config)

    def settings(self) -> dict[str, Any]:
        return {"inverter": "ddim", **asdict(self.config)}

    def kept_timesteps(self, scheduler) -> list[int]:
        grid = ddim_timesteps(scheduler, self.config.n_steps)
        keep = ddim_timesteps(scheduler, self.config.keep_steps)
        missing = sorted(set(keep) - set(grid))
        if missing:
            raise ConfigError(f"inverter.keep_steps={self.config.keep_steps} needs timesteps {missing[:3]}... that "
                              f"n_steps={self.config.n_steps} never visits — use n_steps a multiple of keep_steps")
        if self.config.keep_final and grid[0] not in keep:
            keep = [grid[0]] + keep
        return keep

    @torch.no_grad()
    def invert(self, model, clean: Tensor, prompt: str, progress: bool = True) -> InversionResult:
        scheduler = model.scheduler
        grid = ddim_timesteps(scheduler, self.config.n_steps)[::-1]  # 1, ..., 981: least noisy first
        keep = set(self.kept_timesteps(scheduler))
        cond = model.encode_text(prompt)
        kept: dict[int, list[Tensor]] = {t: [] for t in keep}
        chunks = clean.split(self.config.batch_size)
        bar = tqdm(total=len(grid) * len(chunks), desc="DDIM inversion", unit="step", disable=not progress)
        for chunk in chunks:
            x = chunk.to(model.device, model.dtype)
            emb = cond.expand(len(x), -1, -1)
            for i, t in enumerate(grid):
                t_prev = grid[i - 1] if i > 0 else -1
                eps = model.unet(x, t, encoder_hidden_states=emb).sample
                x = ddim_step(x, eps, alpha_bar(scheduler, t_prev), alpha_bar(scheduler, t))
                if t in keep:
                    kept[t].append(x.float().cpu())
                bar.update(1)
        bar.close()
        order = sorted(keep, reverse=True)
        latents = torch.stack([torch.cat(kept[t]) for t in order])
        return InversionResult(order, latents, clean.float().cpu(), prompt, self.settings())


@torch.no_grad()
def sample(model, x: Tensor, timesteps: list[int], cond: Tensor, uncond: Tensor | None = None,
           guidance_scale: float = 1.0, batch_size: int = 8, progress: bool = True, desc: str = "DDIM sampling") -> Tensor:
    """Plain DDIM sampling of independent frames from ``x`` at ``timesteps[0]`` down the grid.

    cond/uncond: (1, L, D) text embeddings; ``uncond`` is only used when ``guidance_scale != 1``.
    Returns the clean latents (N, 4, h, w) float32 on CPU.
    """
    out = []
    chunks = x.split(batch_size)
    bar = tqdm(total=len(timesteps) * len(chunks), desc=desc, unit="step", disable=not progress)
    for chunk in chunks:
        z = chunk.to(model.device, model.dtype)
        for i, t in enumerate(timesteps):
            if guidance_scale == 1.0 or uncond is None:
                eps = model.unet(z, t, encoder_hidden_states=cond.expand(len(z), -1, -1)).sample
            else:
                emb = torch.cat([uncond.expand(len(z), -1, -1), cond.expand(len(z), -1, -1)])
                e_u, e_c = model.unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            z = ddim_step(z, eps, alpha_bar(model.scheduler, t), alpha_bar(model.scheduler, previous_timestep(timesteps, i)))
            bar.update(1)
        out.append(z.float().cpu())
    bar.close()
    return torch.cat(out)


def reconstruct(model, inversion: InversionResult, steps: list[int] | None = None, progress: bool = True) -> Tensor:
    """DDIM-sample the inversion back to clean latents from its noisiest kept grid timestep, guidance 1."""
    steps = steps or ddim_timesteps(model.scheduler, int(inversion.settings.get("keep_steps", len(inversion.timesteps))))
    cond = model.encode_text(inversion.prompt)
    return sample(model, inversion.at(steps[0]), steps, cond, progress=progress, desc="reconstruction")
