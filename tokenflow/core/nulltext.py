"""Null-text inversion (Mokady et al., 2023) of video frames, per frame.

DDIM inversion at guidance 1 reconstructs well at guidance 1 but drifts under classifier-free
guidance. Null-text inversion keeps the DDIM-inverted trajectory x*_T..x*_0 and, walking it from
the noisiest latent, optimises the unconditional ("null", ``encode_text("")``) embedding of each
step so that a CFG step (``guidance_scale``) from the current latent lands on the next inverted
latent; the latent is then advanced with the optimised embedding (google/prompt-to-prompt,
``null_text_w_ptp.ipynb``: Adam, lr ``1e-2·(1 - i/100)``, 10 inner steps, early stop at
``1e-5 + i·2e-5``). Every frame gets its own embeddings: a batch of F frames optimises one
(F, 77, D) tensor with the per-frame MSE losses summed, so the frames stay independent (a frame
that meets its early stop is frozen while the others go on).

The result's ``null_text`` (:class:`~tokenflow.models.trajectory.NullTextEmbeddings`) is what editors
use as their unconditional branch (:class:`tokenflow.core.guidance.UnconditionalEmbedding`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenflow.core.inversion import DDIMInverter, Inverter, image_conditioning, kept_timesteps, sample
from tokenflow.errors import ConfigError
from tokenflow.models.backbone import TextEmbedding
from tokenflow.models.ddim import ddim_timesteps, previous_timestep
from tokenflow.models.trajectory import FileTrajectory, InversionResult, NullTextEmbeddings, TensorTrajectory, Trajectory
from tokenflow.options import configured


@dataclass
class NullTextInverterConfig:
    n_steps: int = 50              # DDIM grid of inversion and optimisation (= the editing grid)
    guidance_scale: float = 7.5    # CFG weight the null embeddings are optimised for (use the editor's)
    inner_steps: int = 10          # Adam iterations per timestep
    lr: float = 1e-2               # Adam learning rate at the noisiest step, decayed as lr·(1 - i/100)
    early_stop: float = 1e-5       # stop a frame's inner loop when its MSE < early_stop + i·2e-5
    batch_size: int = 8            # frames per UNet call (optimised together)

    def __post_init__(self) -> None:
        for name in ("n_steps", "inner_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inverter.{name}={getattr(self, name)} must be >= 1 — use a positive number")
        if self.n_steps > 100:
            raise ConfigError(f"inverter.n_steps={self.n_steps} exceeds 100: the learning rate lr·(1 - i/100) would turn "
                              "negative — null-text-invert on the editing grid, e.g. n_steps=50")
        if self.guidance_scale < 1:
            raise ConfigError(f"inverter.guidance_scale={self.guidance_scale} must be >= 1 — use the editor's, e.g. 7.5")
        if self.lr <= 0 or self.early_stop < 0:
            raise ConfigError(f"inverter.lr={self.lr} must be > 0 and early_stop={self.early_stop} >= 0 — "
                              "use e.g. lr=0.01, early_stop=1e-5")


def _guided_eps(model, z: Tensor, t: int, uncond: TextEmbedding, cond: TextEmbedding, guidance_scale: float,
                image: Tensor | None = None) -> Tensor:
    """CFG noise for latents z (F, C, h, w) with per-frame embeddings uncond/cond (F, L, D), float32; ``image``
    (F, C', h, w): an image-conditioned UNet's extra channels (both halves)."""
    both = None if image is None else torch.cat([image, image])
    e_u, e_c = model.predict_noise(torch.cat([z, z]), t, TextEmbedding.cat([uncond, cond]), image_latents=both).chunk(2)
    return e_u + guidance_scale * (e_c - e_u)


@configured
class NullTextInverter(Inverter):
    """DDIM inversion plus per-frame, per-timestep optimised null-text embeddings (``result.null_text``)."""

    Config = NullTextInverterConfig
    provides_null_text = True

    def __init__(self, **config: Any) -> None:
        self.config = NullTextInverterConfig(**config)

    def settings(self) -> dict[str, Any]:
        return {"inverter": "nulltext", **asdict(self.config)}

    def kept_timesteps(self, scheduler, image_seq_len: int | None = None) -> list[int]:
        return ddim_timesteps(scheduler, self.config.n_steps)

    def invert(self, model, clean: Tensor, prompt: str, progress: bool = True) -> InversionResult:
        """In RAM: the trajectory and the null-text table as tensors (small clips, tests)."""
        shape = (len(set(kept_timesteps(self, model, tuple(clean.shape[-2:])))), *clean.shape)
        return self.invert_into(model, clean, prompt, TensorTrajectory.empty(shape), progress)

    def invert_into(self, model, clean: Tensor, prompt: str, trajectory: Trajectory,
                    progress: bool = True) -> InversionResult:
        """DDIM inversion into ``trajectory``, then the null-text optimisation, ``batch_size`` frames at a time,
        each step's embeddings written to a table store as they are fitted: in RAM beside a RAM trajectory, else
        an anonymous temporary file (T x N x L x D floats never held: one batch's step at a time)."""
        if getattr(model, "family", "unet") != "unet":
            raise ConfigError(f"null-text inversion optimises DDIM's unconditional embeddings on an SD UNet, not "
                              f"'{model.identity}' — use inverter=ddim (Euler-ODE inversion on flow-matching models)")
        c = self.config
        ddim = DDIMInverter(n_steps=c.n_steps, keep_steps=c.n_steps, batch_size=c.batch_size)
        inversion = ddim.invert_into(model, clean, prompt, trajectory, progress=progress)
        cond, null = model.encode_text(prompt), model.encode_text("")
        shape = (len(inversion.timesteps), inversion.n_frames, 1, *null.hidden.shape[1:])
        table = TensorTrajectory.empty(shape) if isinstance(trajectory, TensorTrajectory) else FileTrajectory.temporary(shape)
        chunks = torch.arange(inversion.n_frames).split(c.batch_size)
        bar = tqdm(total=len(chunks) * c.n_steps * c.inner_steps, desc="null-text optimisation", unit="it",
                   disable=not progress)
        try:
            for frames in chunks:
                self._optimise(model, inversion, frames, cond, null, bar, table)
        except BaseException:
            table.close()
            raise
        finally:
            bar.close()
        inversion.null_text = NullTextEmbeddings(table, c.guidance_scale,
                                                 None if null.pooled is None else null.pooled.float().cpu())
        inversion.settings = self.settings()
        return inversion

    def _optimise(self, model, inversion: InversionResult, frames: Tensor, cond: TextEmbedding, null: TextEmbedding,
                  bar, table: Trajectory) -> None:
        """Fit the null embeddings of ``frames`` (consecutive) at every step, writing step i's (F, L, D) rows into
        slab i of ``table`` (T, N, 1, L, D) as soon as they are fitted."""
        c, timesteps = self.config, inversion.timesteps
        cond = cond.rows(torch.arange(len(frames))).to(dtype=torch.float32)
        uncond = null.hidden.float().expand(len(frames), -1, -1).clone()
        pooled = None if null.pooled is None else null.pooled.float().expand(len(frames), -1)
        store = inversion.trajectory
        z = store.read(0, frames).to(model.device).float()
        image = image_conditioning(model, inversion.clean[frames])
        image = None if image is None else image.to(model.device)
        saved = [p.requires_grad for p in model.denoiser.parameters()]
        model.denoiser.requires_grad_(False)
        try:
            for i, t in enumerate(timesteps):
                t_next = previous_timestep(timesteps, i)
                target = store.read(i + 1, frames) if i + 1 < len(timesteps) else inversion.clean[frames]  # x*_{t_{i+1}}, last: z0
                with torch.no_grad():
                    e_c = model.predict_noise(z, t, cond, image_latents=image)
                uncond = self._fit(model, z, t, t_next, e_c, uncond, pooled, target.to(z), i, bar, image)
                table.write(i, int(frames[0]), uncond.cpu().unsqueeze(1))
                with torch.no_grad():
                    eps = _guided_eps(model, z, t, TextEmbedding(uncond, pooled), cond, c.guidance_scale, image)
                    z = model.ddim_step(z, eps, t, t_next)
        finally:
            for p, flag in zip(model.denoiser.parameters(), saved):
                p.requires_grad_(flag)

    def _fit(self, model, z: Tensor, t: int, t_next: int, e_c: Tensor, uncond: Tensor, pooled: Tensor | None,
             target: Tensor, i: int, bar, image: Tensor | None = None) -> Tensor:
        """Adam on the null embeddings (F, L, D) of step i so the CFG step from z (F, C, h, w) hits ``target``."""
        c = self.config
        uncond = uncond.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([uncond], lr=c.lr * (1.0 - i / 100.0))
        active = torch.ones(len(z), dtype=torch.bool, device=z.device)  # frames not yet early-stopped
        threshold = c.early_stop + i * 2e-5
        for j in range(c.inner_steps):
            idx = active.nonzero().squeeze(1)
            with torch.enable_grad():
                text = TextEmbedding(uncond[idx], None if pooled is None else pooled[idx])
                e_u = model.predict_noise(z[idx], t, text, image_latents=None if image is None else image[idx])
                eps = e_u + c.guidance_scale * (e_c[idx] - e_u)
                losses = (model.ddim_step(z[idx], eps, t, t_next) - target[idx]).pow(2).flatten(1).mean(1)  # (F_active,)
                optimiser.zero_grad()
                losses.sum().backward()
            before = uncond.detach().clone()
            optimiser.step()
            with torch.no_grad():
                uncond[~active] = before[~active]  # a stopped frame keeps its embedding
            active[idx[losses.detach() < threshold]] = False
            bar.update(1)
            if not active.any():
                bar.update(c.inner_steps - 1 - j)
                break
        return uncond.detach()


def null_embeddings(inversion: InversionResult) -> NullTextEmbeddings:
    """The inversion's null-text embeddings; a ConfigError if it has none."""
    if inversion.null_text is None:
        raise ConfigError("this inversion has no null-text embeddings — invert with inverter=nulltext")
    return inversion.null_text


def sample_with_null_text(model, inversion: InversionResult, prompt_embedding: TextEmbedding | Tensor,
                          guidance_scale: float | None = None, batch_size: int = 8, progress: bool = True) -> Tensor:
    """Reconstruct a null-text inversion: CFG-sample from its noisiest latent with the per-step null embeddings.

    prompt_embedding: (1, L, D), usually ``encode_text(inversion.prompt)``; guidance_scale: default the one the
    embeddings were optimised for. Returns clean latents (N, C, h, w), float32 on CPU.
    """
    null = null_embeddings(inversion)
    device = model.device

    def uncond(i: int, frames: Tensor) -> TextEmbedding:
        pooled = None if null.pooled is None else null.pooled.to(device).expand(len(frames), -1)
        return TextEmbedding(null.step(i, frames).to(device), pooled)

    scale = null.guidance_scale if guidance_scale is None else guidance_scale
    return sample(model, inversion.at(inversion.timesteps[0]), inversion.timesteps, prompt_embedding, uncond, scale, batch_size,
                  progress, desc="null-text reconstruction", image_latents=image_conditioning(model, inversion.clean))
