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
from tokenflow.models.trajectory import InversionResult, TensorTrajectory, Trajectory
from tokenflow.samplers import Grid, Sampler, model_sampler, sampler_for
from tokenflow.options import configured


def image_conditioning(model, clean: Tensor) -> Tensor | None:
    """Extra input channels an image-conditioned UNet reads for frames with latents ``clean`` (N, C, h, w).

    InstructPix2Pix-style UNets (in_channels = 2C) read the VAE posterior mode of the frames *without* the
    scaling factor; ``clean`` is the posterior mean (= mode) times that factor, so this is clean / factor,
    float32 (N, C, h, w). None for a text-to-image UNet (in_channels = C).
    """
    if getattr(model, "family", "unet") != "unet":  # MMDiTs read no image channels (FLUX's in_channels are packed)
        return None
    in_channels, c = int(model.denoiser.config.in_channels), model.latent_channels
    if in_channels == c:
        return None
    if in_channels != 2 * c:
        raise ConfigError(f"this UNet takes {in_channels} input channels — only text-to-image ({c}) and "
                          f"InstructPix2Pix-style ({2 * c}: latents + image latents) UNets are supported")
    return clean.float() / model.latent_scale


def image_seq_len(model, latent_hw: tuple[int, int]) -> int | None:
    """Image tokens per frame of a token-sequence model (what resolution-dependent σ schedules read), else None."""
    count = getattr(model, "image_seq_len", None)
    return None if count is None else int(count(latent_hw))


def kept_timesteps(inverter: "Inverter", model, latent_hw: tuple[int, int]) -> list:
    """``inverter.kept_timesteps`` for a model and latent size; the image's token count is passed only where the
    schedule depends on it (so inverters written for ``kept_timesteps(scheduler)`` keep working)."""
    seq_len = image_seq_len(model, latent_hw)
    sampler = model_sampler(model)
    # the scheduler where it decides the sampler alone (inverters written for kept_timesteps(scheduler)), else the
    # backbone's sampler (its pipeline's σ spacing)
    schedule = model.scheduler if getattr(sampler, "spacing", "scheduler") == "scheduler" else sampler
    if seq_len is None or not sampler.config_depends_on_size:
        return inverter.kept_timesteps(schedule)
    return inverter.kept_timesteps(schedule, seq_len)


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
    def kept_timesteps(self, scheduler, image_seq_len: int | None = None) -> list:
        """Timesteps this inverter keeps, noisiest first (``image_seq_len``: for resolution-dependent schedules)."""

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


@configured
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

    def kept_timesteps(self, scheduler, image_seq_len: int | None = None) -> list:
        """The timesteps whose latents the inversion keeps (``scheduler``: a scheduler, or a :class:`Sampler`)."""
        sampler = scheduler if isinstance(scheduler, Sampler) else sampler_for(scheduler)
        grid = sampler.grid(self.config.n_steps, image_seq_len).timesteps
        keep = sampler.grid(self.config.keep_steps, image_seq_len).timesteps
        missing = sorted(set(keep) - set(grid), reverse=True)
        if missing:
            raise ConfigError(f"inverter.keep_steps={self.config.keep_steps} needs timesteps {missing[:3]}... that "
                              f"n_steps={self.config.n_steps} never visits — use n_steps = keep_steps (DDIM: or a "
                              "multiple of it)")
        if self.config.keep_final and grid[0] not in keep:
            keep = [grid[0]] + keep
        return keep

    def invert(self, model, clean: Tensor, prompt: str, progress: bool = True) -> InversionResult:
        shape = (len(set(kept_timesteps(self, model, tuple(clean.shape[-2:])))), *clean.shape)
        return self.invert_into(model, clean, prompt, TensorTrajectory.empty(shape), progress)

    @torch.no_grad()
    def invert_into(self, model, clean: Tensor, prompt: str, trajectory: Trajectory,
                    progress: bool = True, owns: Callable[[int], bool] | None = None) -> InversionResult:
        """Invert ``clean`` (N, C, h, w) in chunks of ``batch_size`` frames, writing each chunk's latents into
        ``trajectory`` (T, N, C, h, w) as soon as they are computed (one timestep's rows at a time).

        ``owns``: invert only the chunks (numbered from 0) it accepts, the others' rows are left unwritten (one
        rank's share, see :func:`tokenflow.core.distributed.invert_split`); None: every chunk."""
        sampler = model_sampler(model)
        seq_len = image_seq_len(model, tuple(clean.shape[-2:]))
        grid = sampler.grid(self.config.n_steps, seq_len)
        order = sorted(set(kept_timesteps(self, model, tuple(clean.shape[-2:]))), reverse=True)  # slab i: order[i]
        if tuple(trajectory.shape) != (len(order), *clean.shape):
            raise ConfigError(f"the trajectory store has shape {tuple(trajectory.shape)}, the inversion needs "
                              f"{(len(order), *clean.shape)} — size it from kept_timesteps and the clean latents")
        slab = {t: i for i, t in enumerate(order)}
        cond = model.encode_text(prompt)
        image = image_conditioning(model, clean)
        chunks = [frames for c, frames in enumerate(torch.arange(clean.shape[0]).split(self.config.batch_size))
                  if owns is None or owns(c)]
        bar = tqdm(total=len(grid) * len(chunks), desc=f"{sampler.label} inversion", unit="step", disable=not progress)
        for frames in chunks:
            x = clean[frames].to(model.device, torch.float32)
            text = cond.rows(torch.arange(len(x)))
            extra = None if image is None else image[frames]
            for n, i in enumerate(reversed(range(len(grid)))):  # least noisy first, from the clean end up
                source, target = grid.after(i), grid.levels[i]
                t = target.timestep
                # the model at the target's timestep, the latents at the source's level
                pred = sampler.to_form(model.predict(x, t, text, image_latents=extra), x, source)
                x_t = sampler.step(x, pred, source, target)
                for _ in range(self.config.fixed_point):  # the prediction where sampling will evaluate it: at x_t
                    pred = sampler.to_form(model.predict(x_t, t, text, image_latents=extra), x_t, target)
                    x_t = sampler.step(x, pred, source, target)
                x = x_t
                check_latents(x, f"{sampler.label} inversion", n, len(grid), t, likely_cause(model.dtype))
                if t in slab:
                    trajectory.write(slab[t], int(frames[0]), x.cpu())
                bar.update(1)
        bar.close()
        return InversionResult(order, trajectory, clean.float().cpu(), prompt, self.settings())


UncondSource = TextEmbedding | Callable[[int, Tensor], TextEmbedding] | None


@torch.no_grad()
def sample(model, x: Tensor, timesteps: "list[int] | Grid", cond: TextEmbedding | Tensor, uncond: UncondSource = None,
           guidance_scale: float = 1.0, batch_size: int = 8, progress: bool = True, desc: str = "sampling",
           image_latents: Tensor | None = None, sampler: Sampler | None = None) -> Tensor:
    """Plain sampling of independent frames from ``x`` (N, C, h, w) at the first level down to clean latents.

    timesteps: a :class:`~tokenflow.samplers.Grid` (or a slice of one), or for DDIM a list of timesteps,
    noisiest first. cond: (1, L, D) or per-frame (N, L, D) text embedding. uncond, used when
    ``guidance_scale != 1``: an embedding like ``cond``, or a function (step index, frames (F,)) → (F, L, D)
    embedding (null-text tables); guidance combines the sampler's form (ε for DDIM, velocity for flow
    matching). image_latents: (N, C', h, w) extra input channels of an image-conditioned UNet, given to both
    branches. ``sampler``: default the one the model's scheduler implies. Returns clean latents (N, C, h, w)
    float32 on CPU.
    """
    from tokenflow.models.backbone import as_text_embedding

    sampler = sampler or model_sampler(model)
    grid = timesteps if isinstance(timesteps, Grid) else sampler.path(list(timesteps))
    cond = as_text_embedding(cond)
    guided = guidance_scale != 1.0 and uncond is not None
    out = []
    chunks = torch.arange(x.shape[0]).split(batch_size)
    bar = tqdm(total=len(grid) * len(chunks), desc=desc, unit="step", disable=not progress)
    for frames in chunks:
        z = x[frames].to(model.device, torch.float32)
        c = cond.rows(frames)
        image = None if image_latents is None else image_latents[frames]
        for i, level in enumerate(grid.levels):
            if guided:
                u = uncond(i, frames) if callable(uncond) else as_text_embedding(uncond).rows(frames)
                both = None if image is None else torch.cat([image, image])
                zz = torch.cat([z, z])
                e_u, e_c = sampler.to_form(model.predict(zz, level.timestep, TextEmbedding.cat([u, c]), image_latents=both),
                                           zz, level).chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            else:
                eps = sampler.to_form(model.predict(z, level.timestep, c, image_latents=image), z, level)
            z = sampler.step(z, eps, level, grid.after(i))
            bar.update(1)
        out.append(z.cpu())
    bar.close()
    return torch.cat(out)


def reconstruct(model, inversion: InversionResult, steps: "list[int] | Grid | None" = None,
                progress: bool = True) -> Tensor:
    """Sample the inversion back to clean latents from its noisiest kept grid timestep, guidance 1 (an
    image-conditioned UNet reads the frames' image latents, as in the inversion). ``steps``: default the
    inversion's kept grid."""
    if steps is None:
        n = int(inversion.settings.get("keep_steps", len(inversion.timesteps)))
        steps = model_sampler(model).grid(n, image_seq_len(model, tuple(inversion.clean.shape[-2:])))
    first = steps.levels[0].timestep if isinstance(steps, Grid) else steps[0]
    cond = model.encode_text(inversion.prompt)
    return sample(model, inversion.at(first), steps, cond, progress=progress, desc="reconstruction",
                  image_latents=image_conditioning(model, inversion.clean))
