"""Peak memory of a run, estimated from the model's shapes before any frame is decoded or any UNet runs.

The estimate is the memory a run adds on top of what the process holds when it is made (imports and
loaded weights: measure that with :func:`current_rss`). It is the largest of four phases, each the sum
of what is alive in it:

* ``encode``: input frames (uint8), ``vae_batch`` of them as float32, the clean latents, the VAE
  encoder's working set for ``vae_batch`` frames;
* ``invert``: frames, clean latents, the UNet's working set for ``inversion_batch`` frames with one
  branch, and the inversion trajectory when it is held in memory (``trajectory_in_memory``; by default
  it is written to disk as computed and read one step at a time: no memory that grows with T x N);
* ``edit``: frames, clean latents, (trajectory in memory), edited latents (twice), the keyframe tokens
  stored for propagation (every self-attention layer, every branch, every held keyframe), the UNet's
  working set for ``branches x max(keyframes, chunk_size)`` samples (the joint keyframe pass is the
  larger call);
* ``decode``: frames, latents, the decoded output frames when gathered (``keep_frames``; streamed to the
  writers otherwise), ``vae_batch`` decoded float32 frames and the VAE decoder's working set.

A UNet's working set is its skip connections plus the largest level's temporaries: ``RESNET_FACTOR``
feature maps of that level's width for a level without attention, ``ATTENTION_FACTOR`` with one
(q, k, v, output, the GEGLU projection to 8x width and its product, norms and residuals). The VAE's
is ``(2 C1 + 3 C0)`` full-resolution maps for decoding (the upsampled input and the last resnet's
temporaries) and ``(3 + 4 C0)`` for encoding. Attention scores are not counted (SDPA's CPU and CUDA
kernels do not materialise them). On CUDA the UNet/VAE working sets, stored tokens and latents are on
the device; frames and the trajectory stay in host memory. Every phase also holds
``RUNTIME_OVERHEAD`` of host memory that does not depend on the run's size.

Measured on the tiny model (8 frames, 5 steps, PnP + TokenFlow, CPU, OMP_NUM_THREADS=1; ``peak_rss_mb``
vs ``estimated_peak_rss_mb`` of the CLI's metrics.json, ``tokenflow-edit model=tiny n_frames=8 height=H
width=H n_steps=5 metrics=none``): the peak RSS is estimated 1% low at 256x256 (1061 vs 1074 MB) and 5%
low at 512x512 (1775 vs 1860 MB). The overhead constant was set from a 2-frame 64x64 run. Against length
(experiments/benchmark_scale.py, 128x128): the estimate puts 480 frames at 1.25x the peak of 24 frames
with unbounded attention (measured 1.51x) and 1.06x with ``experiment=long_video`` (measured 1.10x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tokenflow.errors import ConfigError

RUNTIME_OVERHEAD = 128 << 20  # host memory a run adds whatever its size: video decoders and OpenCV loaded on
#                               first use, oneDNN kernels, allocator slack (116 MB measured on 2 frames at 64x64)
RESNET_FACTOR = 8       # feature maps of a level's width alive in a resnet block (input, norm, act, convs, skip)
ATTENTION_FACTOR = 19   # ... in a transformer block: q, k, v, out (4) + GEGLU 8x + product 4x + norms/residual (3)
TRANSFORMER_FACTOR = 14  # token activations alive in an MMDiT block: q, k, v, out (4) + MLP 4x and its GELU (8)
#                          + modulated norm and residual (2)
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model: widths and levels of the UNet and VAE, dtype size, weights."""

    unet_channels: tuple[int, ...]          # block_out_channels, level 0 (full latent resolution) first
    unet_attention: tuple[bool, ...]        # whether each level's blocks have transformer (attention) layers
    unet_layers: int                        # resnets per down block (up blocks have one more)
    latent_channels: int
    vae_scale: int                          # pixels per latent, per side (8 for SD)
    vae_channels: tuple[int, ...]           # VAE block_out_channels, full resolution first
    element_size: int                       # bytes per element of the UNet's compute dtype
    vae_element_size: int = 4               # ... of the VAE's (SD VAEs run in float32 when upcast)
    weights_bytes: int = 0                  # parameters and buffers (already resident when estimating)
    self_attention_levels: tuple[int, ...] = ()  # the level of every self-attention layer (UNetLayout), in order

    @classmethod
    def from_model(cls, model: Any) -> "ModelShape | TransformerShape":
        """From a :class:`~tokenflow.models.DiffusionModel` (its UNet and VAE configs, its UNet's layout); an MMDiT
        backbone gives its :class:`TransformerShape`."""
        if getattr(model, "family", "unet") == "mmdit":
            return TransformerShape.from_model(model)
        unet = model.denoiser
        weights = sum(t.numel() * t.element_size() for part in (unet, model.vae, model.text_encoder)
                      if part is not None for t in list(part.parameters()) + list(part.buffers()))
        shape = cls.from_configs(dict(unet.config), dict(model.vae.config), int(unet.dtype.itemsize),
                                 int(model.vae_dtype.itemsize), int(weights), unet_module=unet)
        return replace(shape, vae_scale=int(model.vae_scale_factor))

    @classmethod
    def from_configs(cls, unet: dict[str, Any], vae: dict[str, Any], element_size: int, vae_element_size: int = 4,
                     weights_bytes: int = 0, unet_module: Any = None) -> "ModelShape":
        """From the UNet's and VAE's config dicts (``config.json`` of a diffusers folder: no weights needed; the
        self-attention layers are those of :class:`~tokenflow.models.layout.UNetLayout` on ``unet_module``, or on
        the UNet built from ``unet`` on the meta device)."""
        layers = unet["layers_per_block"]
        layers = layers if isinstance(layers, int) else max(layers)
        return cls(tuple(unet["block_out_channels"]), tuple("Attn" in t for t in unet["down_block_types"]),
                   int(layers), int(unet["in_channels"]), 2 ** (len(vae["block_out_channels"]) - 1),
                   tuple(vae["block_out_channels"]), element_size, vae_element_size, weights_bytes,
                   self_attention_levels(unet_module if unet_module is not None else unet))

    def self_attention_tokens(self, h: int, w: int) -> int:
        """Sum over the UNet's self-attention layers (every transformer block's ``attn1``, as
        :class:`~tokenflow.models.layout.UNetLayout` lists them: SDXL's 2 and 10 per block included) of
        tokens x channels at the layer's level, for latents (h, w): what a keyframe stores per branch."""
        return sum(_level_tokens(h, w, level) * self.unet_channels[level] for level in self.self_attention_levels)

    def working_set(self, h: int, w: int, batch: int) -> int:
        """Bytes of one denoiser forward on ``batch`` latents of (h, w)."""
        return unet_working_set(self, h, w, batch)


@dataclass(frozen=True)
class TransformerShape:
    """What the estimate needs from an MMDiT (SD 3 / 3.5): token width, depth, patch, text length, VAE, weights.

    Its working set for a batch of B frames is ``TRANSFORMER_FACTOR`` activations of (S + L) tokens x width
    per frame (S image tokens, L text tokens): q, k, v, the attention output, the 4x MLP and its activation,
    the modulated norms and residuals of the block running, plus the other stream's; attention scores are not
    counted (SDPA's kernels do not materialise them on CUDA; on CPU the math kernel does, per chunk of queries).
    """

    width: int                      # num_attention_heads x attention_head_dim
    attention_layers: int           # image self-attention layers (joint attn + SD 3.5's attn2)
    patch_size: int
    text_tokens: int                # 77 CLIP + max_sequence_length T5 tokens
    latent_channels: int
    vae_scale: int
    vae_channels: tuple[int, ...]
    element_size: int
    vae_element_size: int = 4
    weights_bytes: int = 0

    @classmethod
    def from_model(cls, model: Any) -> "TransformerShape":
        parts = [p for p in model.components().values()]
        weights = sum(t.numel() * t.element_size() for part in parts for t in list(part.parameters()) + list(part.buffers()))
        clip = 0 if hasattr(model.denoiser, "single_transformer_blocks") else 77  # FLUX's text tokens are T5's only
        return cls.from_configs(dict(model.denoiser.config), dict(model.vae.config),
                                int(next(model.denoiser.parameters()).dtype.itemsize), int(model.vae_dtype.itemsize),
                                int(weights), text_tokens=clip + int(model.max_sequence_length))

    @classmethod
    def from_configs(cls, transformer: dict[str, Any], vae: dict[str, Any], element_size: int, vae_element_size: int = 4,
                     weights_bytes: int = 0, text_tokens: int = 77 + 256) -> "TransformerShape":
        """From ``transformer/config.json`` and ``vae/config.json`` of a diffusers SD 3 or FLUX.1 folder (no weights
        needed). FLUX: double- and single-stream blocks each hold one image self-attention; tokens are 2x2-packed
        latents of ``in_channels / 4`` channels."""
        layers = int(transformer["num_layers"])
        dual = len(transformer.get("dual_attention_layers") or ())
        flux = "num_single_layers" in transformer
        single = int(transformer.get("num_single_layers") or 0)
        patch = 2 * int(transformer["patch_size"]) if flux else int(transformer["patch_size"])
        channels = int(transformer["in_channels"]) // 4 if flux else int(transformer["in_channels"])
        return cls(int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"]), layers + dual + single,
                   patch, int(text_tokens), channels,
                   2 ** (len(vae["block_out_channels"]) - 1), tuple(vae["block_out_channels"]), element_size,
                   vae_element_size, weights_bytes)

    def image_tokens(self, h: int, w: int) -> int:
        return (h // self.patch_size) * (w // self.patch_size)

    def self_attention_tokens(self, h: int, w: int) -> int:
        """Tokens x channels a keyframe stores per branch: every image self-attention layer's output."""
        return self.attention_layers * self.image_tokens(h, w) * self.width

    def working_set(self, h: int, w: int, batch: int) -> int:
        return batch * self.element_size * TRANSFORMER_FACTOR * (self.image_tokens(h, w) + self.text_tokens) * self.width


@dataclass(frozen=True)
class RunShape:
    """The run's sizes: frames, output pixels, kept timesteps, UNet batches."""

    n_frames: int
    height: int
    width: int
    n_timesteps: int            # latents kept per frame by the inversion
    branches: int = 3           # UNet branches per frame in the edit (PnP: source, negative, target)
    keyframes: int = 1          # keyframes edited jointly per step
    chunk_size: int = 8         # frames per UNet call in the propagation pass
    inversion_batch: int = 8    # frames per UNet call in the inversion
    vae_batch: int = 8          # frames per VAE call
    cuda: bool = False          # UNet/VAE on a CUDA device (their working sets count on the device)
    held_keyframes: int | None = None  # keyframes whose tokens are held for propagation (None: ``keyframes``)
    anchors: int = 0            # attention.context=anchors: keyframes whose keys/values every keyframe reads
    trajectory_in_memory: bool = False  # the inversion trajectory held in RAM (else on disk, one step read at a time)
    keep_frames: bool = True    # the decoded output frames are gathered (else streamed to the writers)

    def resized(self, height: int, width: int) -> "RunShape":
        return replace(self, height=height, width=width)


@dataclass
class MemoryEstimate:
    """Bytes a run adds at its peak: in host memory, and on the CUDA device (0 on CPU)."""

    host_bytes: int
    device_bytes: int
    phase: str                              # the phase of the larger peak
    parts: dict[str, int] = field(default_factory=dict)  # that phase's contributions

    def as_dict(self) -> dict[str, Any]:
        """MiB figures for a report: phase, host, device, and the phase's parts."""
        return {"phase": self.phase, "host_mb": self.host_bytes / MIB, "device_mb": self.device_bytes / MIB,
                "parts_mb": {name: b / MIB for name, b in self.parts.items()}}

    def describe(self) -> str:
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        return f"{self.phase}: " + ", ".join(f"{name} {_gib(b)}" for name, b in top)


def self_attention_levels(unet: Any) -> tuple[int, ...]:
    """The level (2x downsamplings before it) of each self-attention layer of a UNet module, or of the UNet a
    config dict describes (built on the meta device: no memory, no weights)."""
    from tokenflow.models.layout import UNetLayout

    if isinstance(unet, dict):
        import torch
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config({k: v for k, v in unet.items() if not k.startswith("_")})
    layout = UNetLayout.from_unet(unet)
    return tuple(layout.level[name] for name in layout.self_attention)


def unet_working_set(m: ModelShape, h: int, w: int, batch: int) -> int:
    """Bytes of a UNet forward on ``batch`` latents of (h, w): skip connections + the largest level's temporaries."""
    e, levels = m.element_size, len(m.unet_channels)
    skips = m.unet_channels[0] * _level_tokens(h, w, 0)
    for level, c in enumerate(m.unet_channels):
        skips += m.unet_layers * c * _level_tokens(h, w, level)
        if level < levels - 1:
            skips += c * _level_tokens(h, w, level + 1)
    work = max((ATTENTION_FACTOR if attn else RESNET_FACTOR) * c * _level_tokens(h, w, level)
               for level, (c, attn) in enumerate(zip(m.unet_channels, m.unet_attention)))
    return batch * e * (skips + work)


def vae_working_set(m: ModelShape, height: int, width: int, batch: int, decode: bool) -> int:
    """Bytes of a VAE decoder (or encoder) call on ``batch`` frames of (height, width) pixels."""
    c0 = m.vae_channels[0]
    c1 = m.vae_channels[1] if len(m.vae_channels) > 1 else c0
    maps = 2 * c1 + 3 * c0 if decode else 3 + 4 * c0
    return batch * m.vae_element_size * maps * height * width


def estimate_peak(m: "ModelShape | TransformerShape", r: RunShape) -> MemoryEstimate:
    """The peak memory a run adds (host and device), from the shapes alone; see the module docstring."""
    h, w = r.height // m.vae_scale, r.width // m.vae_scale
    n, f32 = r.n_frames, 4
    vb = min(r.vae_batch, n)
    latents = n * m.latent_channels * h * w * f32
    frames_u8 = n * r.height * r.width * 3
    batch_f32 = vb * 3 * r.height * r.width * f32  # frames float32 only vae_batch at a time (encode, decode)
    trajectory = r.n_timesteps * latents if r.trajectory_in_memory else 0
    output_u8 = frames_u8 if r.keep_frames else vb * r.height * r.width * 3
    held = r.keyframes if r.held_keyframes is None else r.held_keyframes
    tokens = r.branches * held * m.self_attention_tokens(h, w) * m.element_size
    tokens += 2 * (r.branches - 1) * r.anchors * m.self_attention_tokens(h, w) * m.element_size  # anchors' K, V
    net = "UNet" if isinstance(m, ModelShape) else "transformer"
    phases: dict[str, dict[str, tuple[int, bool]]] = {  # name -> part -> (bytes, on the device when CUDA)
        "encode": {"frames": (frames_u8 + batch_f32, False), "latents": (latents, False),
                   "VAE encoder": (vae_working_set(m, r.height, r.width, vb, decode=False), True)},
        "invert": {"frames": (frames_u8, False), "latents": (latents, False),
                   "inversion trajectory": (trajectory, False),
                   net: (m.working_set(h, w, min(r.inversion_batch, n)), True)},
        "edit": {"frames": (frames_u8, False), "inversion trajectory": (trajectory, False),
                 "clean latents": (latents, False), "latents": (2 * latents, True), "keyframe tokens": (tokens, True),
                 net: (m.working_set(h, w, r.branches * max(r.keyframes, min(r.chunk_size, n))), True)},
        "decode": {"frames": (frames_u8 + output_u8 + batch_f32, False), "inversion trajectory": (trajectory, False),
                   "latents": (2 * latents, False),
                   "VAE decoder": (vae_working_set(m, r.height, r.width, vb, decode=True), True)},
    }
    for parts in phases.values():
        parts["libraries and allocator"] = (RUNTIME_OVERHEAD, False)
    totals = {phase: (sum(b for b, dev in parts.values() if not (dev and r.cuda)),
                      sum(b for b, dev in parts.values() if dev and r.cuda)) for phase, parts in phases.items()}
    peak = max(totals, key=lambda phase: max(totals[phase]))
    return MemoryEstimate(max(t[0] for t in totals.values()), max(t[1] for t in totals.values()), peak,
                          {name: b for name, (b, _) in phases[peak].items()})


def length_growth(m: ModelShape, r: RunShape, base_frames: int = 24, held: int = 0) -> float:
    """How much larger the run's peak is than the same run on ``base_frames`` frames: (held + peak at n) /
    (held + peak at base), on the device when CUDA, else in host memory; ``held``: what the process already
    holds (weights, libraries). Joint keyframes scale with the length unless attention is bounded."""
    if r.n_frames <= base_frames:
        return 1.0
    if r.anchors:  # bounded attention: the joint and held keyframes do not depend on the length
        small = replace(r, n_frames=base_frames)
    else:
        k = max(1, math.ceil(r.keyframes * base_frames / r.n_frames)) if r.keyframes else 0
        small = replace(r, n_frames=base_frames, keyframes=k, held_keyframes=None if r.held_keyframes is None else k)
    big, base = estimate_peak(m, r), estimate_peak(m, small)
    pick = (lambda e: e.device_bytes) if r.cuda else (lambda e: e.host_bytes)
    return (held + pick(big)) / (held + pick(base))


def largest_fitting_size(m: ModelShape, r: RunShape, host_free: int, device_free: int | None,
                         max_side: int | None = None) -> tuple[int, int] | None:
    """The largest (height, width), multiples of 64 with about ``r``'s aspect ratio and no side above
    ``max_side``, whose estimate fits; None when not even the smallest does."""
    ratio = max(r.width, r.height) / min(r.width, r.height)
    longest = max_side // 64 * 64 if max_side is not None else None
    short = min(r.height, r.width)
    while short >= 64:
        long = max(64, round(short * ratio / 64) * 64)
        long = min(long, longest) if longest is not None else long  # past the limit the aspect ratio gives way
        size = (short, long) if r.width >= r.height else (long, short)
        if max(size) <= max(r.height, r.width) and fits(estimate_peak(m, r.resized(*size)), host_free, device_free):
            return size
        short -= 64
    return None


def fits(estimate: MemoryEstimate, host_free: int, device_free: int | None) -> bool:
    return estimate.host_bytes <= host_free and (device_free is None or estimate.device_bytes <= device_free)


def check_memory(m: ModelShape, r: RunShape, host_free: int, device_free: int | None = None,
                 what: str = "", max_side: int | None = None) -> MemoryEstimate:
    """The estimate, or a one-line ConfigError with it, what is free and the largest size that fits.

    ``max_side``: the largest side the outputs can have (the video encoder's limit), also refused here.
    """
    estimate = estimate_peak(m, r)
    too_wide = max_side is not None and max(r.height, r.width) > max_side
    if fits(estimate, host_free, device_free) and not too_wide:
        return estimate
    size = largest_fitting_size(m, r, host_free, device_free, max_side)
    fix = (f"the largest size that fits is height={size[0]} width={size[1]}" if size else
           "even 64 pixels a side does not fit — use fewer frames (n_frames=) or a machine with more memory")
    what = what or f"{r.n_frames} frames at {r.height}x{r.width}"
    if not fits(estimate, host_free, device_free):
        on_device = device_free is not None and estimate.device_bytes > device_free
        need, free = (estimate.device_bytes, device_free) if on_device else (estimate.host_bytes, host_free)
        raise ConfigError(f"{what} needs about {_gib(need)} of {'GPU memory' if on_device else 'memory'} "
                          f"({estimate.describe()}) but {_gib(free or 0)} is free — {fix}")
    raise ConfigError(f"{what}: the video encoder takes at most {max_side} pixels a side (the run would need about "
                      f"{_gib(max(estimate.host_bytes, estimate.device_bytes))}) — {fix}")


def current_rss() -> int:
    """Resident memory of this process now, bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes (``getrusage``; Linux reports KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def free_host_memory() -> int:
    """Bytes this process may still allocate: the system's available memory, capped by a cgroup limit and by
    the process's address-space limit (``ulimit -v``, RLIMIT_AS) less the address space it already maps."""
    import resource

    import psutil

    free = int(psutil.virtual_memory().available)
    limit, used = _read_int(Path("/sys/fs/cgroup/memory.max")), _read_int(Path("/sys/fs/cgroup/memory.current"))
    if limit is not None and used is not None:
        free = min(free, max(0, limit - used))
    cap = resource.getrlimit(resource.RLIMIT_AS)[0]
    if cap != resource.RLIM_INFINITY:
        free = min(free, max(0, cap - int(psutil.Process().memory_info().vms)))
    return free


def free_device_memory(device: Any) -> int | None:
    """Free bytes on a CUDA ``device``; None for CPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def _level_tokens(h: int, w: int, level: int) -> int:
    return math.ceil(h / 2**level) * math.ceil(w / 2**level)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / MIB:.0f} MiB"


__all__ = ["ModelShape", "TransformerShape", "RunShape", "MemoryEstimate", "estimate_peak", "check_memory", "largest_fitting_size", "length_growth",
           "unet_working_set", "vae_working_set", "current_rss", "peak_rss", "free_host_memory",
           "free_device_memory"]
