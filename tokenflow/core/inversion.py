"""Inversion of video frames to noise: the ``Inverter`` interface, DDIM inversion and DDIM sampling.

An inversion keeps, for every frame, the latent at each timestep the editor will visit, so PnP's
source branch and TokenFlow's correspondences can read the source video at any editing step. Latents
and DDIM arithmetic stay in float32 whatever the model's dtype (only the UNet's inputs are cast).

An image-conditioned UNet (InstructPix2Pix: latents + the input frames' latents, 8 channels) cannot be
inverted from text alone: inversion, reconstruction and the editor's source branch condition it on the
frames' own image latents (:func:`image_conditioning`) and the inversion prompt.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenflow.core.numerics import check_latents, likely_cause
from tokenflow.errors import ConfigError
from tokenflow.models.backbone import TextEmbedding
from tokenflow.models.ddim import ddim_timesteps, previous_timestep
from tokenflow.models.trajectory import InversionResult, TensorTrajectory, Trajectory


def image_conditioning(model, clean: Tensor) -> Tensor | None:
    """Extra input channels an image-conditioned UNet reads for frames with latents ``clean`` (N, C, h, w).

    InstructPix2Pix-style UNets (in_channels = 2C) read the VAE posterior mode of the frames *without* the
    scaling factor; ``clean`` is the posterior mean (= mode) times that factor, so this is clean / factor,
    float32 (N, C, h, w). None for a text-to-image UNet (in_channels = C).
    """
    in_channels, c = int(model.unet.config.in_channels), model.latent_channels
    if in_channels == c:
        return None
    if in_channels != 2 * c:
        raise ConfigError(f"this UNet takes {in_channels} input channels — only text-to-image ({c}) and "
                          f"InstructPix2Pix-style ({2 * c}: latents + image latents) UNets are supported")
    return clean.float() / model.latent_scale


class Inverter(ABC):
    """Maps clean latents z0 to the noisy latents along a sampling trajectory."""

    #: the result carries null-text embeddings (``InversionResult.null_text``) for the unconditional branch
    provides_null_text: bool = False

    @abstractmethod
    def invert(self, model, clean: Tensor, prompt: str, progress: bool = True) -> InversionResult:
        """clean: (N, C, h, w) float32 latents of the frames → an :class:`InversionResult`."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes the result; part of the inversion cache key."""

    @abstractmethod
    def kept_timesteps(self, scheduler) -> list[int]:
        """Timesteps this inverter keeps, noisiest first."""

    def invert_into(self, model, clean: Tensor, prompt: str, trajectory: Trajectory,
                    progress: bool = True) -> InversionResult:
        """Like :meth:`invert`, with the latents written into ``trajectory`` (T, N, C, h, w), e.g. a file.

        This default inverts in RAM and copies the result slab by slab; an inverter that can write each
        slab as it is produced (:class:`DDIMInverter`) overrides it, so RAM never holds T x N latents.
        """
        result = self.invert(model, clean, prompt, progress=progress)
        for i in range(len(result.timesteps)):
            trajectory.write(i, 0, result.trajectory.read(i))
        result.trajectory.close()
        return InversionResult(result.timesteps, trajectory, result.clean, result.prompt, result.settings,
                               result.null_text, result.extras)


@dataclass
class DDIMInverterConfig:
    n_steps: int = 50          # inversion steps (the official code uses 500)
    keep_steps: int = 50       # keep the latents on the n-step DDIM grid the editor samples on
    keep_final: bool = False   # also keep the last inverted latent (t = 999 for 500 steps), as the official code
    batch_size: int = 8        # frames per UNet call
    fixed_point: int = 0       # extra UNet evaluations per step refining x_t so the DDIM step back from it lands
                               # exactly on x_{t-1} (fixed-point inversion): exact round trips with few steps

    def __post_init__(self) -> None:
        for name in ("n_steps", "keep_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inverter.{name}={getattr(self, name)} must be >= 1 — use a positive number")
        if self.fixed_point < 0:
            raise ConfigError(f"inverter.fixed_point={self.fixed_point} must be >= 0 — 0 is plain DDIM inversion, "
                              "1-3 refine each step")
        if self.keep_steps > self.n_steps:
            raise ConfigError(f"inverter.keep_steps={self.keep_steps} exceeds n_steps={self.n_steps} — "
                              "invert with at least as many steps as the editor samples")


class DDIMInverter(Inverter):
    """Deterministic DDIM inversion conditioned on the inversion prompt, without guidance.

    Plain DDIM inversion approximates the noise at x_t by the noise at x_{t-1}; with ``fixed_point`` = k it
    then re-evaluates the noise at its x_t estimate k times, each time recomputing x_t from x_{t-1} with it,
    which converges to the x_t whose DDIM sampling step returns to x_{t-1} (fixed-point inversion, as in
    Pan et al. 2023 and ReNoise, Garibi et al. 2024): k + 1 UNet evaluations per step instead of 1, and far
    fewer steps for the same reconstruction. An image-conditioned (InstructPix2Pix) UNet is also
    conditioned on the frames' image latents.
    """

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

    def invert(self, model, clean: Tensor, prompt: str, progress: bool = True) -> InversionResult:
        shape = (len(set(self.kept_timesteps(model.scheduler))), *clean.shape)
        return self.invert_into(model, clean, prompt, TensorTrajectory.empty(shape), progress)

    @torch.no_grad()
    def invert_into(self, model, clean: Tensor, prompt: str, trajectory: Trajectory,
                    progress: bool = True) -> InversionResult:
        """Invert ``clean`` (N, C, h, w) in chunks of ``batch_size`` frames, writing each chunk's latents into
        ``trajectory`` (T, N, C, h, w) as soon as they are computed (one timestep's rows at a time)."""
        grid = ddim_timesteps(model.scheduler, self.config.n_steps)[::-1]  # 1, ..., 981: least noisy first
        order = sorted(set(self.kept_timesteps(model.scheduler)), reverse=True)  # slab i holds order[i]
        if tuple(trajectory.shape) != (len(order), *clean.shape):
            raise ConfigError(f"the trajectory store has shape {tuple(trajectory.shape)}, the inversion needs "
                              f"{(len(order), *clean.shape)} — size it from kept_timesteps and the clean latents")
        slab = {t: i for i, t in enumerate(order)}
        cond = model.encode_text(prompt)
        image = image_conditioning(model, clean)
        chunks = torch.arange(clean.shape[0]).split(self.config.batch_size)
        bar = tqdm(total=len(grid) * len(chunks), desc="DDIM inversion", unit="step", disable=not progress)
        for frames in chunks:
            x = clean[frames].to(model.device, torch.float32)
            text = cond.rows(torch.arange(len(x)))
            extra = None if image is None else image[frames]
            for i, t in enumerate(grid):
                t_prev = grid[i - 1] if i > 0 else -1
                # the UNet at t, the latents at t_prev's level
                eps = model.predict_noise(x, t, text, level=t_prev, image_latents=extra)
                x_t = model.ddim_step(x, eps, t_prev, t)
                for _ in range(self.config.fixed_point):  # the noise where sampling will evaluate it: at x_t
                    x_t = model.ddim_step(x, model.predict_noise(x_t, t, text, image_latents=extra), t_prev, t)
                x = x_t
                check_latents(x, "DDIM inversion", i, len(grid), t, likely_cause(model.dtype))
                if t in slab:
                    trajectory.write(slab[t], int(frames[0]), x.cpu())
                bar.update(1)
        bar.close()
        return InversionResult(order, trajectory, clean.float().cpu(), prompt, self.settings())


UncondSource = TextEmbedding | Callable[[int, Tensor], TextEmbedding] | None


@torch.no_grad()
def sample(model, x: Tensor, timesteps: list[int], cond: TextEmbedding | Tensor, uncond: UncondSource = None,
           guidance_scale: float = 1.0, batch_size: int = 8, progress: bool = True, desc: str = "DDIM sampling",
           image_latents: Tensor | None = None) -> Tensor:
    """Plain DDIM sampling of independent frames from ``x`` (N, C, h, w) at ``timesteps[0]`` down the grid.

    cond: (1, L, D) or per-frame (N, L, D) text embedding. uncond, used when ``guidance_scale != 1``: an
    embedding like ``cond``, or a function (step index, frames (F,)) → (F, L, D) embedding (null-text
    tables). image_latents: (N, C', h, w) extra input channels of an image-conditioned UNet, given to both
    branches. Returns the clean latents (N, C, h, w) float32 on CPU.
    """
    from tokenflow.models.backbone import as_text_embedding

    cond = as_text_embedding(cond)
    guided = guidance_scale != 1.0 and uncond is not None
    out = []
    chunks = torch.arange(x.shape[0]).split(batch_size)
    bar = tqdm(total=len(timesteps) * len(chunks), desc=desc, unit="step", disable=not progress)
    for frames in chunks:
        z = x[frames].to(model.device, torch.float32)
        c = cond.rows(frames)
        image = None if image_latents is None else image_latents[frames]
        for i, t in enumerate(timesteps):
            if guided:
                u = uncond(i, frames) if callable(uncond) else as_text_embedding(uncond).rows(frames)
                both = None if image is None else torch.cat([image, image])
                e_u, e_c = model.predict_noise(torch.cat([z, z]), t, TextEmbedding.cat([u, c]), image_latents=both).chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            else:
                eps = model.predict_noise(z, t, c, image_latents=image)
            z = model.ddim_step(z, eps, t, previous_timestep(timesteps, i))
            bar.update(1)
        out.append(z.cpu())
    bar.close()
    return torch.cat(out)


def reconstruct(model, inversion: InversionResult, steps: list[int] | None = None, progress: bool = True) -> Tensor:
    """DDIM-sample the inversion back to clean latents from its noisiest kept grid timestep, guidance 1
    (an image-conditioned UNet reads the frames' image latents, as in the inversion)."""
    steps = steps or ddim_timesteps(model.scheduler, int(inversion.settings.get("keep_steps", len(inversion.timesteps))))
    cond = model.encode_text(inversion.prompt)
    return sample(model, inversion.at(steps[0]), steps, cond, progress=progress, desc="reconstruction",
                  image_latents=image_conditioning(model, inversion.clean))
