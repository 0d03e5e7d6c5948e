"""Null-text inversion (Mokady et al., 2023) of video frames, per frame, and its use by tokenflow.editors.

DDIM inversion at guidance 1 reconstructs well at guidance 1 but drifts under classifier-free
guidance. Null-text inversion keeps the DDIM-inverted trajectory x*_T..x*_0 and, walking it from
the noisiest latent, optimises the unconditional ("null", ``encode_text("")``) embedding of each
step so that a CFG step (``guidance_scale``) from the current latent lands on the next inverted
latent; the latent is then advanced with the optimised embedding (google/prompt-to-prompt,
``null_text_w_ptp.ipynb``: Adam, lr ``1e-2·(1 - i/100)``, 10 inner steps, early stop at
``1e-5 + i·2e-5``). Every frame gets its own embeddings: a batch of F frames optimises one
(F, 77, D) tensor with the per-frame MSE losses summed, so the frames stay independent (a frame
that meets its early stop is frozen while the others go on).

Editors reconstruct with these embeddings as the unconditional branch (:class:`UnconditionalEmbedding`)
when the negative prompt is empty; a negative prompt replaces them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenflow.models.ddim import alpha_bar, ddim_step, ddim_timesteps, previous_timestep
from tokenflow.core.editor import EditInputs
from tokenflow.errors import ConfigError
from tokenflow.core.inversion import DDIMInverter, Inverter
from tokenflow.models.trajectory import InversionResult

NULL_EMBEDDINGS = "null_embeddings"  # InversionResult.extras key: (T, N, 77, D), aligned with timesteps


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


def _guided_eps(model, z: Tensor, t: int, uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """CFG noise for latents z (F, 4, h, w) with per-frame embeddings uncond/cond (F, L, D), float32."""
    emb = torch.cat([uncond, cond]).to(model.dtype)
    e_u, e_c = model.unet(torch.cat([z, z]).to(model.dtype), t, encoder_hidden_states=emb).sample.float().chunk(2)
    return e_u + guidance_scale * (e_c - e_u)


class NullTextInverter(Inverter):
    """DDIM inversion plus per-frame, per-timestep optimised null-text embeddings (``extras``)."""

    Config = NullTextInverterConfig

    def __init__(self, **config: Any) -> None:
        self.config = NullTextInverterConfig(**config)

    def settings(self) -> dict[str, Any]:
        return {"inverter": "nulltext", **asdict(self.config)}

    def kept_timesteps(self, scheduler) -> list[int]:
        return ddim_timesteps(scheduler, self.config.n_steps)

    def invert(self, model, clean: Tensor, prompt: str, progress: bool = True) -> InversionResult:
        c = self.config
        ddim = DDIMInverter(n_steps=c.n_steps, keep_steps=c.n_steps, batch_size=c.batch_size)
        inversion = ddim.invert(model, clean, prompt, progress=progress)
        cond, null = model.encode_text(prompt).float(), model.encode_text("").float()
        chunks = torch.arange(inversion.n_frames).split(c.batch_size)
        bar = tqdm(total=len(chunks) * c.n_steps * c.inner_steps, desc="null-text optimisation", unit="it",
                   disable=not progress)
        tables = [self._optimise(model, inversion, frames, cond, null, bar) for frames in chunks]
        bar.close()
        inversion.extras[NULL_EMBEDDINGS] = torch.cat(tables, dim=1)
        inversion.settings = self.settings()
        return inversion

    def _optimise(self, model, inversion: InversionResult, frames: Tensor, cond: Tensor, null: Tensor,
                  bar) -> Tensor:
        """Null embeddings (T, F, L, D) float32 on CPU for ``frames`` of the inversion."""
        c, sched, timesteps = self.config, model.scheduler, inversion.timesteps
        cond = cond.expand(len(frames), -1, -1)
        uncond = null.expand(len(frames), -1, -1).clone()
        z = inversion.latents[0, frames].to(model.device).float()
        targets = list(inversion.latents[1:, frames]) + [inversion.clean[frames]]  # x*_{t_{i+1}}, last: z0
        saved = [p.requires_grad for p in model.unet.parameters()]
        model.unet.requires_grad_(False)
        table = []
        try:
            for i, t in enumerate(timesteps):
                alphas = alpha_bar(sched, t), alpha_bar(sched, previous_timestep(timesteps, i))
                with torch.no_grad():
                    e_c = model.unet(z.to(model.dtype), t, encoder_hidden_states=cond.to(model.dtype)).sample.float()
                uncond = self._fit(model, z, t, e_c, uncond, targets[i].to(z), alphas, i, bar)
                table.append(uncond.cpu())
                with torch.no_grad():
                    z = ddim_step(z, _guided_eps(model, z, t, uncond, cond, c.guidance_scale), *alphas)
        finally:
            for p, flag in zip(model.unet.parameters(), saved):
                p.requires_grad_(flag)
        return torch.stack(table)

    def _fit(self, model, z: Tensor, t: int, e_c: Tensor, uncond: Tensor, target: Tensor,
             alphas: tuple[float, float], i: int, bar) -> Tensor:
        """Adam on the null embeddings (F, L, D) of step i so the CFG step from z (F, 4, h, w) hits ``target``."""
        c = self.config
        uncond = uncond.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([uncond], lr=c.lr * (1.0 - i / 100.0))
        active = torch.ones(len(z), dtype=torch.bool, device=z.device)  # frames not yet early-stopped
        threshold = c.early_stop + i * 2e-5
        for j in range(c.inner_steps):
            idx = active.nonzero().squeeze(1)
            with torch.enable_grad():
                e_u = model.unet(z[idx].to(model.dtype), t, encoder_hidden_states=uncond[idx].to(model.dtype)).sample.float()
                eps = e_u + c.guidance_scale * (e_c[idx] - e_u)
                losses = (ddim_step(z[idx], eps, *alphas) - target[idx]).pow(2).flatten(1).mean(1)  # (F_active,)
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


@torch.no_grad()
def sample_with_null_text(model, inversion: InversionResult, prompt_embedding: Tensor, guidance_scale: float = 7.5,
                          batch_size: int = 8, progress: bool = True) -> Tensor:
    """Reconstruct a null-text inversion: CFG-sample from its noisiest latent with the per-step null embeddings.

    prompt_embedding: (1, L, D), usually ``encode_text(inversion.prompt)``. Returns clean latents (N, 4, h, w),
    float32 on CPU.
    """
    table = null_embeddings(inversion)
    timesteps, sched = inversion.timesteps, model.scheduler
    out = []
    frame_chunks = torch.arange(inversion.n_frames).split(batch_size)
    bar = tqdm(total=len(timesteps) * len(frame_chunks), desc="null-text reconstruction", unit="step",
               disable=not progress)
    for frames in frame_chunks:
        z = inversion.latents[0, frames].to(model.device).float()
        cond = prompt_embedding.expand(len(frames), -1, -1).float()
        for i, t in enumerate(timesteps):
            eps = _guided_eps(model, z, t, table[i, frames].to(model.device), cond, guidance_scale)
            z = ddim_step(z, eps, alpha_bar(sched, t), alpha_bar(sched, previous_timestep(timesteps, i)))
            bar.update(1)
        out.append(z.cpu())
    bar.close()
    return torch.cat(out)


def null_embeddings(inversion: InversionResult) -> Tensor:
    """The inversion's null-text table (T, N, L, D); a ConfigError if it has none."""
    table = inversion.extras.get(NULL_EMBEDDINGS)
    if table is None:
        raise ConfigError("this inversion has no null-text embeddings — invert with inverter=nulltext")
    return table


class UnconditionalEmbedding:
    """The ``uncond`` branch's embedding at each timestep of an edit.

    With a null-text inversion and an empty negative prompt: that frame's optimised null embedding at
    the timestep, a per-frame table (N, L, D) (null-text inversion reconstructs with the empty prompt as
    the unconditional branch). Otherwise the negative prompt's embedding (1, L, D), the same at every step.
    The null embeddings were fitted along the reconstruction from the noisiest inverted latent; an edit that
    starts elsewhere (SDEdit below strength 1) uses them as an approximation.
    """

    def __init__(self, inputs: EditInputs) -> None:
        self.model = inputs.model
        table = inputs.inversion.extras.get(NULL_EMBEDDINGS)
        self.table = table if table is not None and inputs.negative_prompt == "" else None
        self.timesteps = list(inputs.inversion.timesteps)
        self.negative = None if self.table is not None else inputs.model.encode_text(inputs.negative_prompt)
        self._last: tuple[int, Tensor] | None = None

    @property
    def null_text(self) -> bool:
        return self.table is not None

    def at(self, t: int) -> Tensor:
        """(1, L, D) negative-prompt embedding, or the (N, L, D) null-text embeddings at timestep t."""
        if self.table is None:
            return self.negative
        if self._last is None or self._last[0] != t:
            if t not in self.timesteps:
                raise ConfigError(f"the null-text inversion has no embedding at t={t} — invert with the editing "
                                  f"grid (inverter.n_steps = n_steps)")
            emb = self.table[self.timesteps.index(t)].to(self.model.device, self.model.dtype)
            self._last = (t, emb)
        return self._last[1]
