"""DDIM arithmetic as small pure functions (eta = 0), shared by inversion, sampling and editing."""
from __future__ import annotations

import torch
from torch import Tensor


def ddim_timesteps(scheduler, n_steps: int) -> list[int]:
    """The ``n_steps`` DDIM grid of ``scheduler``'s config, noisiest first (e.g. 981, 961, ..., 1 for 50)."""
    from diffusers import DDIMScheduler

    grid = DDIMScheduler.from_config(scheduler.config)  # a copy: never mutate the model's scheduler
    grid.set_timesteps(n_steps)
    return [int(t) for t in grid.timesteps]


def alpha_bar(scheduler, t: int) -> float:
    """ᾱ_t; for t < 0 (one step below the grid) the scheduler's ``final_alpha_cumprod``."""
    if t < 0:
        return float(scheduler.final_alpha_cumprod)
    return float(scheduler.alphas_cumprod[t])


def ddim_step(x: Tensor, eps: Tensor, alpha_from: float, alpha_to: float) -> Tensor:
    """Move ``x`` from noise level ᾱ_from to ᾱ_to along the DDIM ODE with noise prediction ``eps``.

    Sampling uses (ᾱ_t, ᾱ_prev); inversion uses (ᾱ_prev, ᾱ_t): the same formula read backwards.
    """
    pred_x0 = (x - (1 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    return alpha_to**0.5 * pred_x0 + (1 - alpha_to) ** 0.5 * eps


def previous_timestep(timesteps: list[int], i: int) -> int:
    """The timestep after ``timesteps[i]`` in sampling order (noisiest first); -1 past the end."""
    return timesteps[i + 1] if i + 1 < len(timesteps) else -1


def add_noise(scheduler, x0: Tensor, eps: Tensor, t: int) -> Tensor:
    """Forward process q(x_t | x_0) with given noise: √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
    a = alpha_bar(scheduler, t)
    return a**0.5 * x0 + (1 - a) ** 0.5 * eps


def noise_from_latent(scheduler, x0: Tensor, xt: Tensor, t: int) -> Tensor:
    """The ε for which ``add_noise(x0, ε, t) == xt``."""
    a = alpha_bar(scheduler, t)
    return (xt - a**0.5 * x0) / (1 - a) ** 0.5


def to_tensor_timestep(t: int, device: torch.device) -> Tensor:
    return torch.tensor(t, device=device, dtype=torch.long)
