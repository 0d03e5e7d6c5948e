"""DDIM arithmetic as small pure functions (eta = 0), shared by inversion, sampling and editing.

Every UNet output passes through :func:`to_epsilon` (the one place that reads the scheduler's
``prediction_type``) and every latent update through :func:`ddim_step`; both run in float32 whatever
the model's dtype. The results equal diffusers' ``DDIMScheduler.step`` / ``DDIMInverseScheduler.step``.
"""
from __future__ import annotations

from torch import Tensor

from tokenflow.errors import ConfigError, ModelLoadError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_scheduler(scheduler) -> None:
    """Refuse, in one line, a scheduler configuration the DDIM arithmetic here does not reproduce."""
    cfg = scheduler.config
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ModelLoadError(f"scheduler prediction_type={kind!r} is not supported — this library converts "
                             f"{', '.join(PREDICTION_TYPES)} (fix the checkpoint's scheduler/scheduler_config.json)")
    if cfg.get("thresholding", False):
        raise ModelLoadError("scheduler thresholding=True (dynamic thresholding, for pixel-space models) is not "
                             "supported — set thresholding to false in scheduler_config.json")
    if cfg.get("rescale_betas_zero_snr", False):
        raise ModelLoadError("scheduler rescale_betas_zero_snr=True (zero terminal SNR) is not supported: DDIM "
                             "inversion divides by ᾱ_t — use a checkpoint with the standard schedule")


def ddim_timesteps(scheduler, n_steps: int) -> list[int]:
    """The ``n_steps`` DDIM grid of ``scheduler``'s config, noisiest first (e.g. 981, 961, ..., 1 for 50)."""
    from diffusers import DDIMScheduler

    trained = int(scheduler.config.get("num_train_timesteps", 1000))
    if not 1 <= n_steps <= trained:
        raise ConfigError(f"{n_steps} DDIM steps on a model trained with {trained} timesteps — use n_steps (and "
                          f"inverter.n_steps) between 1 and {trained}")
    grid = DDIMScheduler.from_config(scheduler.config)  # a copy: never mutate the model's scheduler
    grid.set_timesteps(n_steps)
    return [int(t) for t in grid.timesteps]


def alpha_bar(scheduler, t: int) -> float:
    """ᾱ_t; for t < 0 (one step below the grid) the scheduler's ``final_alpha_cumprod``."""
    if t < 0:
        return float(scheduler.final_alpha_cumprod)
    return float(scheduler.alphas_cumprod[t])


def clip_range(scheduler) -> float | None:
    """The range predicted x0 is clipped to (``clip_sample``), or None when it is not clipped."""
    cfg = scheduler.config
    return float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", False) else None


def to_epsilon(output: Tensor, x: Tensor, alpha: float, prediction_type: str) -> Tensor:
    """The noise ε implied by a UNet ``output`` for latents ``x`` at noise level ᾱ = ``alpha`` (float32).

    epsilon: the output; v_prediction: √ᾱ·v + √(1-ᾱ)·x; sample (x0): (x - √ᾱ·x0) / √(1-ᾱ).
    """
    output, x = output.float(), x.float()
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha**0.5 * output + (1 - alpha) ** 0.5 * x
    if prediction_type == "sample":
        return (x - alpha**0.5 * output) / (1 - alpha) ** 0.5
    raise ModelLoadError(f"prediction_type={prediction_type!r} is not supported — use one of {', '.join(PREDICTION_TYPES)}")


def ddim_step(x: Tensor, eps: Tensor, alpha_from: float, alpha_to: float, clip: float | None = None) -> Tensor:
    """Move ``x`` from noise level ᾱ_from to ᾱ_to along the DDIM ODE with noise prediction ``eps``.

    Sampling uses (ᾱ_t, ᾱ_prev); inversion uses (ᾱ_prev, ᾱ_t): the same formula read backwards.
    ``clip``: clamp the predicted x0 to [-clip, clip] (``clip_sample``); the direction term keeps the
    unclipped ε, as diffusers' schedulers do (``use_clipped_model_output=False``, what its pipelines pass).
    """
    x, eps = x.float(), eps.float()
    pred_x0 = (x - (1 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    if clip is not None:
        pred_x0 = pred_x0.clamp(-clip, clip)
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
