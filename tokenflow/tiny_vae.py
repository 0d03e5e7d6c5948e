"""Fit the tiny pipeline's random VAE into a usable (blurry) autoencoder on synthetic images.

The tiny VAE (``tokenflow.tiny``) has random weights and reconstructs images at ~10 dB PSNR, so every
decoded video looks like noise. :func:`fit_tiny_vae` trains it in place for about a minute of CPU time
on images generated on the fly (smooth multi-scale colour fields, shapes with hard and soft edges,
stripes, textured noise), so demo outputs resemble their input. No data sets, no downloads; all
randomness comes from one dedicated ``torch.Generator``, so the same seed gives the same weights.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

__all__ = ["fit_tiny_vae", "synthetic_images"]


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g)


def _smooth_field(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Sum of bicubic-upsampled uniform noise at several scales, per-image random spectrum slope."""
    out = torch.zeros(n, 3, size, size)
    slope = 0.5 + 1.5 * _rand(g, n, 1, 1, 1)  # larger → smoother
    total = torch.zeros(n, 1, 1, 1)
    res = 2
    while res <= size // 2:
        coarse = _rand(g, n, 3, res, res) * 2 - 1
        w = (res / 2.0) ** (-slope)
        out += w * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        total += w
        res *= 2
    out = out / total
    # random contrast stretch so fields span a good part of [-1, 1]
    std = out.flatten(1).std(dim=1).view(n, 1, 1, 1).clamp_min(1e-3)
    gain = (0.25 + 0.45 * _rand(g, n, 1, 1, 1)) / std
    # partly desaturate: natural images have strongly correlated channels
    grey = out.mean(dim=1, keepdim=True)
    sat = _rand(g, n, 1, 1, 1)
    out = grey + sat * (out - grey)
    offset = (_rand(g, n, 3, 1, 1) * 2 - 1) * 0.4
    return out * gain + offset


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return xx, yy


def _shape_masks(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    """(n, 1, S, S) soft masks of random rotated rectangles, ellipses or half-planes (edges)."""
    xx, yy = _grid(size)
    cx, cy = (_rand(g, 2, n, 1, 1) * 2 - 1) * 1.1
    theta = _rand(g, n, 1, 1) * math.pi
    ax = 0.08 + 0.6 * _rand(g, n, 1, 1)
    ay = 0.08 + 0.6 * _rand(g, n, 1, 1)
    u = (xx - cx) * torch.cos(theta) + (yy - cy) * torch.sin(theta)
    v = -(xx - cx) * torch.sin(theta) + (yy - cy) * torch.cos(theta)
    kind = (_rand(g, n, 1, 1) * 3).floor()
    rect = torch.maximum(u.abs() / ax, v.abs() / ay) - 1
    ellipse = torch.sqrt((u / ax) ** 2 + (v / ay) ** 2) - 1
    edge = u * 3
    sdf = torch.where(kind == 0, rect, torch.where(kind == 1, ellipse, edge))
    # edge softness from one pixel (hard) to blurry
    softness = (0.5 + 6 * _rand(g, n, 1, 1) ** 2) * 2 / size
    return torch.sigmoid(-sdf / softness).unsqueeze(1)


def _stripes(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    """(n, 1, S, S) sinusoidal or square gratings in [0, 1], random frequency/orientation/phase."""
    xx, yy = _grid(size)
    theta = _rand(g, n, 1, 1) * math.pi
    freq = 1 + (size / 6) * _rand(g, n, 1, 1) ** 2  # cycles per image, up to ~1/3 Nyquist
    phase = _rand(g, n, 1, 1) * 2 * math.pi
    s = torch.sin(math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    square = _rand(g, n, 1, 1) < 0.5
    s = torch.where(square, torch.tanh(4 * s), s)
    return (0.5 + 0.5 * s).unsqueeze(1)


def _colour(g: torch.Generator, n: int) -> torch.Tensor:
    return _rand(g, n, 3, 1, 1) * 2 - 1


def synthetic_images(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    """A batch (n, 3, size, size) in [-1, 1] of synthetic natural-ish images, drawn from ``g`` only."""
    img = _smooth_field(g, n, size)
    # composite a few layers of shapes, each filled with a flat colour, a smooth field or a grating
    for _ in range(4):
        present = (_rand(g, n, 1, 1, 1) < 0.6).float()
        mask = _shape_masks(g, n, size) * present
        fill_kind = _rand(g, n, 1, 1, 1)
        flat = _colour(g, n).expand(n, 3, size, size)
        field = _smooth_field(g, n, size)
        grating = _colour(g, n) + (_colour(g, n) - _colour(g, n)) * _stripes(g, n, size)
        fill = torch.where(fill_kind < 0.4, flat, torch.where(fill_kind < 0.75, field, grating))
        img = img * (1 - mask) + fill * mask
    # textured noise: fine grain at a random amplitude, sometimes slightly blurred
    grain = torch.randn(n, 3, size, size, generator=g)
    grain = 0.5 * grain + 0.5 * grain.mean(dim=1, keepdim=True)
    amp = 0.12 * _rand(g, n, 1, 1, 1) ** 2
    img = img + amp * grain
    # occasional global blur (defocus) via down/up sampling
    blur = _rand(g, n, 1, 1, 1) < 0.25
    blurred = F.interpolate(F.avg_pool2d(img, 2), size=(size, size), mode="bilinear", align_corners=False)
    img = torch.where(blur, blurred, img)
    return img.clamp(-1, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR in dB for tensors in [-1, 1] (data range 2)."""
    mse = ((a - b) ** 2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def _eval_psnr(vae, images: torch.Tensor) -> float:
    out = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    return _psnr(out, images)


@torch.no_grad()
def _zero_init_residuals(vae) -> None:
    """Zero every residual branch's last layer (ResNet ``conv2``, attention ``to_out``): SkipInit.

    The VAE then starts as a shallow conv chain (conv_in → strided convs → conv_out, and back with
    nearest upsampling) and its residual branches grow from zero, which trains much faster than the
    random deep stack.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for m in vae.modules():
        if isinstance(m, ResnetBlock2D):
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
        elif isinstance(m, Attention):
            m.to_out[0].weight.zero_()
            m.to_out[0].bias.zero_()


def fit_tiny_vae(vae, seed: int, steps: int = 400, image_size: int = 64, batch_size: int = 8,
                 lr: float = 2e-3, kl_weight: float = 1e-4, clip: float = 1.0, zero_init: bool = True) -> dict:
    """Train ``vae`` (a diffusers ``AutoencoderKL``) in place on synthetic images; deterministic in ``seed``.

    Loss per step: L1 + MSE reconstruction of the posterior mean's decoding, plus ``kl_weight`` × the
    mean KL divergence to N(0, I) so latents stay roughly unit-scaled. Adam with a short warm-up and
    cosine decay. All data comes from a dedicated ``torch.Generator(seed)``; the global RNG is not used.
    Leaves the VAE in ``eval()`` mode with ``requires_grad_(False)``.

    Returns ``{"steps", "batch_size", "image_size", "seconds", "train_loss", "psnr_before",
    "psnr_after", "latent_std"}`` — PSNRs (dB, data range 2) on a held-out synthetic batch.
    """
    g_eval = torch.Generator().manual_seed(seed + 7919)
    held_out = synthetic_images(g_eval, 8, image_size)
    vae.eval()
    psnr_before = _eval_psnr(vae, held_out)
    if zero_init:
        _zero_init_residuals(vae)

    g = torch.Generator().manual_seed(seed)
    vae.train()
    vae.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    start = time.perf_counter()
    loss_ema = None
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x = synthetic_images(g, batch_size, image_size)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.mean).sample
            rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
            kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar).mean()
            loss = rec + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            value = float(rec.detach())
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
    finally:
        vae.eval()
        vae.requires_grad_(False)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        latent_std = float(vae.encode(held_out).latent_dist.mean.std())
    return {
        "steps": steps,
        "batch_size": batch_size,
        "image_size": image_size,
        "seconds": round(seconds, 2),
        "train_loss": loss_ema,
        "psnr_before": psnr_before,
        "psnr_after": _eval_psnr(vae, held_out),
        "latent_std": latent_std,
    }
