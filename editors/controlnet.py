"""ControlNet (Zhang et al., 2023) as a TokenFlow keyframe editor, on top of another editor (PnP by default).

The ``base`` editor is any UNet keyframe editor with its own settings (``editor.base.pnp_attn_t``,
``editor.base.conv_layers``, ``editor.base._target_=tokenflow.editors.CFGEditor``; ``base=cfg`` / ``base=pnp``
for their defaults). Its edit branches (``latents="edit"``, e.g. ``uncond`` and ``cond``) get each ControlNet's residuals
through :attr:`Branch.unet_inputs`, computed from that branch's latents, timestep and text and the
per-frame condition maps of the call's frames; the residuals of several ControlNets are summed (as
diffusers' ``MultiControlNetModel``). The source branch gets none (zeros), so PnP's features and
TokenFlow's correspondences come from the uncontrolled source video. A ControlNet acts on the steps
i with ``start <= i/n`` and ``(i+1)/n <= end`` (diffusers' ``control_guidance_start/end``).

Condition maps (:mod:`tokenflow.editors.conditions`) are computed once per run from the input
frames. ControlNets load by hub id or folder (``source``), or ``tiny``: a random one built offline for
the model's UNet (tests, demos). ControlNets themselves run per frame, with their own attention.
"""
from __future__ import annotations

import logging
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from tokenflow.core.editor import Branch, BranchCall, EditInputs, KeyframeEditor, Step, WrappingEditor
from tokenflow.editors.cfg import CFGEditor
from tokenflow.editors.conditions import Condition, condition_maps, input_frames
from tokenflow.editors.pnp import PnPEditor
from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.options import choice, configured, non_negative

log = logging.getLogger(__name__)


class Base(str, Enum):
    """The base editors named by a word, with their default settings."""

    pnp = "pnp"   # Plug-and-Play injection from the source branch, with CFG
    cfg = "cfg"   # classifier-free guidance only (no source branch needed)


BASE_EDITORS = {Base.pnp: PnPEditor, Base.cfg: CFGEditor}
MOVED = ("guidance_scale", "pnp_f_t", "pnp_attn_t")  # settings of the base editor, under editor.base since 2026-12


@dataclass
class ControlSpec:
    """One ControlNet: where its weights are, its condition and its weight."""

    source: str = "thibaud/controlnet-sd21-canny-diffusers"  # hub id, folder, or "tiny"
    condition: Condition = Condition.canny   # canny | softedge | maps
    scale: float = 1.0                       # conditioning scale (diffusers' controlnet_conditioning_scale)
    start: float = 0.0                       # fraction of the steps before the control starts
    end: float = 1.0                         # fraction of the steps after which it stops
    low_threshold: int = 100                 # canny thresholds (on the 3x3 Sobel L1 gradient)
    high_threshold: int = 200
    sigma: float = 2.0                       # softedge: Gaussian smoothing (px)
    maps: Optional[str] = None               # condition=maps: video or folder of precomputed maps
    revision: Optional[str] = None
    local_files_only: bool = False


@dataclass
class ControlNetConfig:
    # the editor the ControlNets steer: a KeyframeEditor, a node {_target_: <editor class>, <its settings>}, or the
    # word pnp | cfg (that editor with its defaults)
    base: Any = Base.pnp.value
    controlnets: dict[str, ControlSpec] = field(default_factory=lambda: {"canny": ControlSpec()})
    cache_dir: Optional[str] = None          # where source=tiny builds its ControlNet; None = the user cache dir
    tiny_seed: int = 0

    def __post_init__(self) -> None:
        if not self.controlnets:
            raise ConfigError("editor.controlnets is empty — give at least one, e.g. editor.controlnets.canny.source=tiny")
        self.controlnets = {name: _spec(name, spec) for name, spec in self.controlnets.items()}


def _spec(name: str, spec: Any) -> ControlSpec:
    key = f"editor.controlnets.{name}"
    if not isinstance(spec, ControlSpec):
        known = {f.name for f in fields(ControlSpec)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"{key} has no setting {unknown[0]!r} — valid settings: {sorted(known)}")
        spec = ControlSpec(**spec)
    spec.condition = choice(Condition, spec.condition, f"{key}.condition")
    spec.scale = non_negative(spec.scale, f"{key}.scale", "1.0 is the usual conditioning scale")
    if not 0.0 <= spec.start < spec.end <= 1.0:
        raise ConfigError(f"{key}.start={spec.start}, end={spec.end} must satisfy 0 <= start < end <= 1 — "
                          "they are fractions of the denoising steps")
    if not 0 <= spec.low_threshold <= spec.high_threshold:
        raise ConfigError(f"{key}.low_threshold={spec.low_threshold} must be in [0, high_threshold="
                          f"{spec.high_threshold}] — e.g. 100 and 200")
    if spec.condition is Condition.maps and not spec.maps:
        raise ConfigError(f"{key}.condition=maps needs {key}.maps=path/to/maps.mp4 (or a folder of images)")
    return spec


def base_editor(base: Any) -> KeyframeEditor:
    """``editor.base`` as an editor: an editor as given, a ``{_target_: ..., settings}`` node built (the class
    imported by its dotted path, as Hydra does), or ``pnp`` / ``cfg`` with their defaults."""
    if isinstance(base, KeyframeEditor):
        return base
    if isinstance(base, Mapping):
        settings = dict(base)
        target = settings.pop("_target_", None)
        if not isinstance(target, str) or "." not in target:
            raise ConfigError(f"editor.base={settings} names no editor class — add editor.base._target_="
                              "tokenflow.editors.PnPEditor (or use editor.base=pnp | cfg)")
        module, _, name = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"editor.base._target_={target!r} cannot be imported ({e}) — check the dotted path") from e
        editor = cls(**settings)
    else:
        editor = BASE_EDITORS[choice(Base, base, "editor.base")]()
    if not isinstance(editor, KeyframeEditor):
        raise ConfigError(f"editor.base is a {type(editor).__qualname__}, not a KeyframeEditor — name an editor class")
    return editor


@dataclass
class Control:
    """A loaded ControlNet with its condition maps (N, 3, H, W) in [0, 1] on its device and dtype."""

    name: str
    spec: ControlSpec
    net: torch.nn.Module
    maps: Tensor

    def scale_at(self, step: Step) -> float:
        """The conditioning scale at ``step``: 0 outside [start, end] (diffusers' ``controlnet_keep``)."""
        off = step.index / step.n_steps < self.spec.start or (step.index + 1) / step.n_steps > self.spec.end
        return 0.0 if off else self.spec.scale


def load_controlnet(spec: ControlSpec, model, cache_dir: str | None = None, tiny_seed: int = 0,
                    key: str = "source") -> torch.nn.Module:
    """``spec.source`` as a diffusers ``ControlNetModel`` on the model's device and dtype, checked against its UNet.

    ``key``: the setting's name in error messages (e.g. ``editor.controlnets.canny.source``).
    """
    from diffusers import ControlNetModel

    source, local_only = spec.source, spec.local_files_only
    if source == "tiny":
        from tokenflow.models.tiny_extras import TinyControlNetSpec, tiny_controlnet_folder
        from tokenflow.paths import default_cache_dir

        path, local_only = str(tiny_controlnet_folder(cache_dir or default_cache_dir(), model.denoiser,
                                                      TinyControlNetSpec(seed=tiny_seed))), True
    elif Path(source).expanduser().exists():
        path = str(Path(source).expanduser().resolve())
    elif source.startswith((".", "/", "~")):
        raise ModelLoadError(f"{key}: ControlNet folder '{source}' does not exist — check the path or use a hub id")
    else:
        path = source
    try:
        net = ControlNetModel.from_pretrained(path, torch_dtype=model.dtype, revision=spec.revision,
                                              local_files_only=local_only)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot load ControlNet {key}='{source}': {first[:200]} — check the id/path, download it "
                             f"first while online (or set HF_HUB_OFFLINE=0), or use {key}=tiny offline") from e
    mine, theirs = net.config, model.denoiser.config
    if (mine.cross_attention_dim, tuple(mine.block_out_channels)) != (theirs.cross_attention_dim,
                                                                       tuple(theirs.block_out_channels)):
        raise ConfigError(f"ControlNet {key}='{source}' is for another UNet (cross_attention_dim "
                          f"{mine.cross_attention_dim}, widths {tuple(mine.block_out_channels)}; the model has "
                          f"{theirs.cross_attention_dim}, "
                          f"{tuple(theirs.block_out_channels)}) — use a ControlNet trained for this model")
    return net.to(model.device).eval().requires_grad_(False)


@configured
class ControlNetEditor(WrappingEditor):
    """A ``base`` editor (PnP or CFG) whose edit branches are steered by one or more ControlNets; everything else
    is the base editor's (:class:`~tokenflow.core.editor.WrappingEditor`)."""

    families = ("unet",)  # ControlNet residuals enter the UNet's down/mid blocks
    Config = ControlNetConfig

    def __init__(self, **config) -> None:
        moved = [k for k in MOVED if k in config]
        if moved:
            raise ConfigError(f"editor.{moved[0]} is a setting of the base editor: editor.base.{moved[0]}="
                              f"{config[moved[0]]} (the base editor's own settings sit under editor.base)")
        self.config = ControlNetConfig(**config)
        self.base: KeyframeEditor = base_editor(self.config.base)
        self.controls: list[Control] = []
        self._nets: dict[tuple, torch.nn.Module] = {}  # loaded ControlNets, kept across runs on the same model

    def check(self, model) -> None:
        added = getattr(model.denoiser.config, "addition_embed_type", None)
        if added is not None:  # SDXL's text_time: its ControlNets need the added conditions, not passed here
            raise ConfigError(f"editor=controlnet drives ControlNets of UNets without added conditions (SD 1.x/2.x); "
                              f"this UNet takes addition_embed_type={added!r} (SDXL), not supported yet — "
                              "use an SD 1.x/2.x model")
        self.base.check(model)

    def prepare(self, inputs: EditInputs) -> None:
        model = inputs.model
        self.check(model)
        self.base.prepare(inputs)
        frames = input_frames(inputs)
        self.controls = []
        for name, spec in self.config.controlnets.items():
            key = (spec.source, spec.revision, model.fingerprint, str(model.device))
            if key not in self._nets:
                self._nets[key] = load_controlnet(spec, model, self.config.cache_dir, self.config.tiny_seed,
                                                  f"editor.controlnets.{name}.source")
            maps = condition_maps(spec.condition, frames, low_threshold=spec.low_threshold,
                                  high_threshold=spec.high_threshold, sigma=spec.sigma, maps=spec.maps)
            self.controls.append(Control(name, spec, self._nets[key], maps.to(model.device, model.dtype)))
            log.info("ControlNet %s: %s, %s maps, scale %.2f", name, spec.source, spec.condition.value, spec.scale)

    def residuals(self, call: BranchCall) -> dict[str, Any]:
        """The summed ControlNet residuals for one branch's rows; {} when every control is off at this step."""
        down: list[Tensor] | None = None
        mid: Tensor | None = None
        for control in self.controls:
            scale = control.scale_at(call.step)
            if scale == 0.0:
                continue
            net = control.net
            d, m = net(call.latents.to(net.device, net.dtype), call.timestep,
                       encoder_hidden_states=call.text.hidden.to(net.device, net.dtype),
                       controlnet_cond=control.maps[call.frames.to(net.device)], conditioning_scale=scale,
                       return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if mid is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def branches(self, step: Step) -> list[Branch]:
        return [replace(b, unet_inputs=self.residuals) if b.latents == "edit" else b for b in self.base.branches(step)]
