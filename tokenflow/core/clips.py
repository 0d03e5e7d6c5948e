"""AdaFlow's adaptive clips (Zhang et al., ICML 2025): cut a video where its content changes, from frame features.

The video is cut greedily: a clip grows while each next frame still matches the clip's reference frame —
for every token of the reference, its best cosine match among the candidate's tokens; the candidate starts
a new clip when the mean of those best matches is below ``mean_threshold`` (0.75), or when any window of
``max(h, w) // 16`` tokens a side, stepped by ``max(h, w) // 32``, averages below ``region_threshold``
(0.6), or when the clip has reached ``max_clip`` frames (400). :class:`~tokenflow.core.keyframes.
AdaptiveKeyframes` then draws one keyframe per clip and step.

``formula="reference"`` reproduces AdaFlow's loop (``run.py``, ``prepare_dift_matching``) exactly, quirks
included: after a cut at frame c the new clip starts at c but is compared against frame c + 1 (c itself
is never a reference), and a cut leaving only the last frame ends the search (that frame joins the clip).
The default compares each clip against its own first frame. Window sides are at least 1 (AdaFlow's
``range`` step would be 0 below 32 tokens a side).

The features (:func:`frame_features`, ``features=source``) are the source video's own tokens at one
self-attention layer of the denoiser, read from one pass over the clean latents at the grid's least noisy
timestep. ``features=dift`` is AdaFlow's choice (:func:`dift_features`, Tang et al.'s DIFT: the output of
UNet decoder block 2 for the latents noised to t=0, empty prompt, averaged over an ensemble of 8 noise
draws), on an SD UNet only; ``dift_encode=reference`` encodes the frames as AdaFlow's SDFeaturizer does.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor

from tokenflow.errors import ConfigError
from tokenflow.models.layout import MMDiTLayout, patch_grid, token_grid
from tokenflow.rng import seeded


class ClipFormula(str, Enum):
    default = "default"       # each clip compared against its own first frame
    reference = "reference"   # AdaFlow's loop as published (see the module docstring)


def similar_enough(best: Tensor, mean_threshold: float, region_threshold: float) -> bool:
    """Whether a candidate frame stays in the clip: ``best`` (h, w) holds each reference token's best cosine match
    in the candidate; its mean and every window's mean must reach the thresholds (AdaFlow's ``check_similarity``)."""
    if float(best.mean()) < mean_threshold:
        return False
    h, w = best.shape
    side, stride = max(1, max(h, w) // 16), max(1, max(h, w) // 32)
    windows = best.unfold(0, min(side, h), stride).unfold(1, min(side, w), stride)  # (i, j, side, side)
    return bool(windows.mean(dim=(-1, -2)).min() >= region_threshold) if windows.numel() else True


def _best_match(reference: Tensor, candidate: Tensor) -> Tensor:
    """(h, w): for every token of ``reference`` (h, w, C), its best cosine similarity among ``candidate``'s tokens."""
    h, w, c = reference.shape
    a = torch.nn.functional.normalize(reference.reshape(-1, c).float(), dim=-1)
    b = torch.nn.functional.normalize(candidate.reshape(-1, c).float(), dim=-1)
    return (a @ b.T).amax(dim=1).reshape(h, w)


def adaptive_clips(features: Tensor, mean_threshold: float = 0.75, region_threshold: float = 0.6,
                   max_clip: int = 400, formula: ClipFormula | str = ClipFormula.default) -> list[int]:
    """First frames of the clips of a video with per-frame ``features`` (N, h, w, C); always starts with 0."""
    formula = ClipFormula(formula)
    n = features.shape[0]
    starts, ref = [0], 0
    while ref < n:
        for candidate in range(ref + 1, n):
            long = candidate - ref >= (max_clip - 1 if formula is ClipFormula.reference else max_clip)
            if long or not similar_enough(_best_match(features[ref], features[candidate]), mean_threshold,
                                          region_threshold):
                starts.append(candidate)
                if formula is ClipFormula.reference:  # AdaFlow compares the next clip against its second frame
                    ref = candidate + 1
                    ref += int(ref == n - 1)
                else:
                    ref = candidate
                break
        else:
            ref = n
    return starts


def default_feature_layer(layout: Any) -> str:
    """The layer :func:`frame_features` reads by default: on a UNet the first decoder self-attention at the
    latents' own resolution (AdaFlow's DIFT features are decoder features at that size); on an MMDiT the
    middle double-stream / joint block's attention (its input is the image tokens alone)."""
    if isinstance(layout, MMDiTLayout):
        joint = [n for n in layout.self_attention if n.startswith("transformer_blocks.") and n.endswith(".attn")]
        return joint[len(joint) // 2]
    finest = [n for n in layout.self_attention if layout.stage.get(n) == "up" and layout.level.get(n) == 0]
    return finest[0] if finest else layout.self_attention[-1]


class FeatureSource(str, Enum):
    source = "source"   # the source video's tokens at one self-attention layer (no extra model call per noise)
    dift = "dift"       # DIFT: a UNet decoder block's output for the noised clean latents, an ensemble mean


class DiftEncoding(str, Enum):
    mean = "mean"             # the clean latents the run already has (VAE posterior mean of frames in [-1, 1])
    reference = "reference"   # AdaFlow's SDFeaturizer: frames in [0, 1] into the VAE, its posterior *sampled*


def dift_features(model: Any, latents: Tensor | None, up_block: int = 2, t: int = 0, ensemble: int = 8, seed: int = 0,
                  batch: int = 8, encode: DiftEncoding | str = DiftEncoding.mean, frames: Any = None) -> Tensor:
    """(N, h, w, C) float32 on CPU: DIFT features (Tang et al. 2023, as AdaFlow uses them) — the output of
    ``up_blocks[up_block]`` of the model's UNet for each frame's latents noised to timestep ``t``
    (``DDIMScheduler.add_noise``), empty prompt, averaged over ``ensemble`` Gaussian draws; each call stops after
    that block.

    ``encode="mean"``: the run's clean ``latents`` (N, C, h, w), ``batch`` frames per call, draws from a CPU
    generator seeded with ``seed``. ``encode="reference"``: AdaFlow's SDFeaturizer exactly — the input ``frames``
    (N, H, W, 3) uint8 scaled to [0, 1] (not [-1, 1]) go through the VAE, whose posterior is *sampled* for each of
    the ``ensemble`` copies (encoded as one batch); then the noise, drawn as ``randn_like`` does, in the memory
    layout the VAE hands back (channels-last on CPU: the same draws land on other elements than a contiguous
    ``randn``); both from one generator on the model's device seeded with ``seed`` (AdaFlow's draws are the first
    on the device after ``seed_everything``), frame by frame, one call of ``ensemble`` copies per frame."""
    encode = DiftEncoding(encode)
    unet = getattr(model, "unet", None)
    blocks = getattr(unet, "up_blocks", None)
    if blocks is None:
        raise ConfigError(f"keyframes.features=dift reads an SD UNet's decoder blocks; '{model.identity}' has none — "
                          "use keyframes.features=source")
    if not 0 <= up_block < len(blocks):
        raise ConfigError(f"keyframes.dift_block={up_block} does not exist — this UNet has decoder blocks 0-{len(blocks) - 1}")
    if encode is DiftEncoding.reference and frames is None:
        raise ConfigError("keyframes.dift_encode=reference encodes the input frames themselves — pass the video "
                          "(TokenFlowPipeline(video, ...) or .edit(..., video=video)), or use dift_encode=mean")
    alpha = float(model.alpha(int(t)))
    text = model.encode_text("")
    seen: list[Tensor] = []

    def capture(mod, args, output):
        seen.append(output.detach().float())
        raise _Captured

    def block_output(z: Tensor) -> Tensor:
        try:
            model.predict(z, int(t), text.rows(torch.zeros(len(z), dtype=torch.long)))
        except _Captured:
            pass
        return seen.pop()

    out = []
    handle = blocks[up_block].register_forward_hook(capture)
    try:
        with torch.no_grad():
            if encode is DiftEncoding.reference:
                generator = seeded(seed, model.device)
                for frame in frames:
                    image = torch.from_numpy(frame).permute(2, 0, 1)[None].to(model.device, model.vae_dtype) / 255
                    copies = image.repeat(int(ensemble), 1, 1, 1)  # encoded as a batch, as SDFeaturizer does: the
                    z0 = model.vae.encode(copies).latent_dist.sample(generator) * model.latent_scale  # VAE's output
                    noise = torch.empty_like(z0).normal_(generator=generator)  # layout orders the draw (randn_like)
                    z = alpha ** 0.5 * z0 + (1 - alpha) ** 0.5 * noise
                    out.append(block_output(z).mean(0, keepdim=True).permute(0, 2, 3, 1).cpu())
            else:
                generator = seeded(seed)
                for chunk in torch.arange(latents.shape[0]).split(max(1, int(batch))):
                    z0 = latents[chunk].float()
                    acc = None
                    for _ in range(int(ensemble)):
                        noise = torch.randn(z0.shape, generator=generator)
                        ft = block_output((alpha ** 0.5 * z0 + (1 - alpha) ** 0.5 * noise).to(model.device))
                        acc = ft if acc is None else acc + ft
                    out.append((acc / int(ensemble)).permute(0, 2, 3, 1).cpu())
    finally:
        handle.remove()
    return torch.cat(out)


def features_at(features: Tensor, frames: Tensor, grid: tuple[int, int], device: Any = None) -> Tensor:
    """(F, h·w, C) float32: the per-frame ``features`` (N, h', w', C) of ``frames`` (F,) resized to a layer's token
    ``grid`` (h, w) by bilinear interpolation (``align_corners=False``, as AdaFlow resizes its DIFT features to
    each UNet resolution), on ``device`` (default: the features')."""
    x = features[frames.to(features.device)].to(device or features.device, torch.float32).permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) != tuple(grid):
        x = torch.nn.functional.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


class _Captured(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def frame_features(model: Any, latents: Tensor, timestep: Any, text: Any, layer: str, batch: int = 8,
                   image_latents: Tensor | None = None) -> Tensor:
    """(N, h, w, C) float32 on CPU: the input tokens of self-attention ``layer`` (a name of the model's layout)
    for each of ``latents`` (N, C, h, w) at ``timestep`` with ``text`` (one prompt), ``batch`` frames per call;
    each call stops at that layer."""
    layout = model.layout()
    if layer not in layout.self_attention:
        raise ConfigError(f"keyframes.layer={layer!r} is not a self-attention layer of this model — use one of "
                          f"{', '.join(layout.self_attention[:4])}, ... (model.layout().self_attention)")
    module = model.denoiser.get_submodule(layer)
    seen: list[Tensor] = []

    def capture(mod, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().float().cpu())
        raise _Captured

    grid = patch_grid if isinstance(layout, MMDiTLayout) else token_grid
    hw = (int(latents.shape[-2]), int(latents.shape[-1]))
    out = []
    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for frames in torch.arange(latents.shape[0]).split(max(1, int(batch))):
                z = latents[frames].to(model.device, torch.float32)
                rows = text.rows(torch.arange(len(frames))) if hasattr(text, "rows") else text
                image = None if image_latents is None else image_latents[frames].to(z)
                try:
                    model.predict(z, timestep, rows, image_latents=image)
                except _Captured:
                    pass
                if not seen:
                    raise RuntimeError(f"layer {layer} was not called in the forward pass")
                tokens = seen.pop()
                h, w = grid(hw, tokens.shape[1])
                out.append(tokens.reshape(len(frames), h, w, -1))
    finally:
        handle.remove()
    return torch.cat(out)
