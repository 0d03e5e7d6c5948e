"""The ``KeyframeEditor`` interface: what an image-editing method contributes to each denoising step.

An editor names the conditioning branches of its UNet batch (e.g. PnP: negative prompt and target
prompt, on top of the pipeline's source branch), may change self-attention Q/K/V and install its own
hooks (feature injection, cross-attention control), and turns the branches' noise predictions into
the noise for the DDIM step (guidance). It never sees keyframes or propagation: the pipeline and the
propagator handle those, so any image editor works with TokenFlow.

A branch carries everything its part of the UNet call needs beyond latents and timestep: a text
embedding (with SDXL's pooled embedding), extra input channels (InstructPix2Pix's image latents, a
depth map) and further UNet inputs computed per call (ControlNet residuals).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch
from torch import Tensor

from tokenflow.errors import ConfigError
from tokenflow.models.backbone import TextEmbedding, as_text_embedding
from tokenflow.models.trajectory import InversionResult
from tokenflow.options import choice

SOURCE = "source"  # name of the branch that carries the inverted source video


class Latents(str, Enum):
    """What a branch feeds the model (``Branch.latents``); a ``str`` enum, so ``b.latents == "edit"`` holds."""

    edit = "edit"       # the latents being edited (editors' hooks inject into these branches)
    source = "source"   # the inverted source latents at the current timestep (or the branch's ``make_latents``)


class Phase(str, Enum):
    """Which kind of model call is in progress (``Step.phase``); the attention processors act on it."""

    keyframes = "keyframes"   # the keyframes, edited jointly (extended self-attention); their tokens are kept
    anchors = "anchors"       # attention=anchors: the anchor keyframes, jointly; their keys/values are kept
    anchored = "anchored"     # attention=anchors: the other keyframes, each attending to itself and the anchors
    propagate = "propagate"   # the other frames: self-attention outputs propagated from the keyframes'
    frames = "frames"         # per-frame editing (no keyframes): every frame its own self-attention


@dataclass(frozen=True)
class BranchCall:
    """What a branch's ``unet_inputs`` receives for one UNet call: its part of the batch."""

    latents: Tensor            # (F, C, h, w) float32, the latents this branch feeds the UNet
    timestep: int
    frames: Tensor             # (F,) global frame indices
    text: TextEmbedding        # (F, L, D) this branch's text conditioning
    step: "Step"


@dataclass(frozen=True)
class Branch:
    """One conditioning branch of the UNet batch.

    embedding: a :class:`~tokenflow.models.backbone.TextEmbedding` (or a bare (n, L, D) tensor for SD
    1.x/2.x) shared by all frames (n = 1) or one per frame of the video (n = N, e.g. null-text
    embeddings), indexed by the frames of each UNet call.
    latents: ``"edit"`` (the latents being edited) or ``"source"`` (the inverted source latents at the
    current timestep). joint: keyframes of this branch attend to each other (extended self-attention);
    the source branch stays per-frame.
    image_latents: extra input channels concatenated to the latents, (1 or N, C', h, w) — e.g.
    InstructPix2Pix's encoded input frames (zeros for its image-free branch).
    unet_inputs: called per UNet call with a :class:`BranchCall`; returns extra UNet keyword inputs for
    this branch's rows (e.g. ``down_block_additional_residuals``/``mid_block_additional_residual`` of a
    ControlNet). Branches without them get zeros of the same shape.
    make_latents: called per model call with the edited latents of the call's frames (F, C, h, w) and the
    :class:`Step`; returns the latents this branch feeds the model instead (FlowEdit's Z_src and Z_tar). The
    branch's ``latents`` still says what it is: ``"edit"`` branches are the edited ones (editors' hooks inject
    into them), a ``"source"`` branch reads the source video.
    guidance: the guidance *input* of a guidance-distilled model (FLUX.1-dev) for this branch's rows; None:
    the model's default (``model.guidance``). Refused on a model without one.

    A joint branch's keyframes attend to each other and its attention outputs are propagated; a non-joint
    branch attends per frame in every phase (the source branch: as its propagator's ``source_features`` say).
    """

    name: str
    embedding: TextEmbedding | Tensor
    latents: Latents = Latents.edit
    joint: bool = True
    image_latents: Tensor | None = None
    unet_inputs: Callable[[BranchCall], dict[str, Any]] | None = None
    make_latents: Callable[[Tensor, "Step"], Tensor] | None = None
    guidance: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "embedding", as_text_embedding(self.embedding))
        object.__setattr__(self, "latents", choice(Latents, self.latents, f"Branch {self.name!r}: latents"))

    @property
    def text(self) -> TextEmbedding:
        return self.embedding  # type: ignore[return-value]


@dataclass
class Step:
    """What the hooks may read about the model call in progress.

    The call's batch is branch-major: row ``b * F + f`` is branch ``branches[b]`` at frame ``frames[f]`` (F =
    ``len(frames)``), so a hook's tensor of B·F rows unflattens to (B, F, ...) with ``x.unflatten(0, (B, -1))``
    (``len(branches)`` = B); attention hooks receive Q/K/V already as (B, F, S, C).
    """

    index: int                 # 0-based position in the editing schedule
    timestep: int
    n_steps: int
    phase: Phase
    frames: Tensor             # global indices of the frames in this call (F,)
    keyframes: Tensor          # global keyframe indices at this step (K,), empty without keyframes
    branches: tuple[Branch, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.phase = choice(Phase, self.phase, "Step.phase")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    def index_of(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    @property
    def edit_branches(self) -> list[int]:
        """Positions of the branches whose latents are being edited."""
        return [i for i, b in enumerate(self.branches) if b.latents is Latents.edit]

    @property
    def progress(self) -> float:
        """Fraction of the schedule already done, 0 at the first step."""
        return self.index / self.n_steps

    def within(self, fraction: float) -> bool:
        """Whether this step is among the first ``fraction`` of the schedule (PnP's and P2P's thresholds)."""
        return self.index < int(self.n_steps * fraction)


@dataclass
class EditInputs:
    """What an editor is prepared with before the loop."""

    model: Any                 # tokenflow.models.DiffusionModel
    inversion: InversionResult
    prompt: str
    negative_prompt: str
    inversion_prompt: str
    grid: list[int]            # the full sampling grid, noisiest first (the edit may run a tail of it: SDEdit)
    frames: Any = None         # (N, H, W, 3) uint8 input frames when the caller has them (e.g. ControlNet conditions)
    sampler: Any = None        # the run's tokenflow.samplers.Sampler (levels, forward process); None: the model's

    def __post_init__(self) -> None:
        if self.sampler is None and getattr(self.model, "scheduler", None) is not None:
            from tokenflow.samplers import model_sampler

            self.sampler = model_sampler(self.model)


class KeyframeEditor(ABC):
    """Base class of image-editing backends (PnP, SDEdit, Prompt-to-Prompt, ControlNet, your own)."""

    #: the editor reads the source branch (feature injection); the pipeline then always runs it
    needs_source: bool = False
    #: the editor starts from and reads an inversion trajectory; False (inversion-free editors such as FlowEdit):
    #: the pipeline only encodes the frames, writes no trajectory, and the editor's branches make their own latents
    needs_inversion: bool = True
    #: backbone families it drives (``model.family``: "unet", "mmdit"); None: any (it only guides and steps)
    families: tuple[str, ...] | None = None
    #: samplers whose guidance form it works in (``sampler.name``: "ddim", "flow_match_euler"); None: any
    samplers: tuple[str, ...] | None = None

    @abstractmethod
    def prepare(self, inputs: EditInputs) -> None:
        """Encode prompts and precompute schedules for one run."""

    @abstractmethod
    def branches(self, step: Step) -> list[Branch]:
        """The edit branches of the UNet batch at this step (the pipeline adds the source branch)."""

    @abstractmethod
    def guide(self, eps: dict[str, Tensor], step: Step) -> Tensor:
        """Noise predictions by branch name (F, C, h, w), float32 → the noise used for the DDIM step."""

    def check(self, model) -> None:
        """Refuse, before any inversion is computed, a model this editor cannot drive (one clear line)."""

    def source_settings(self) -> dict[str, Any] | None:
        """The editor's settings the source branch's tokens depend on, beyond the inversion (FlowEdit: its noise
        draws); they key reusable correspondence records. Default: none."""
        return None

    def source_branch(self, branch: Branch) -> Branch:
        """The source branch the pipeline adds, adapted to this editor (e.g. image latents); default as is."""
        return branch

    def branch_count(self, model, source: bool) -> int:
        """Model evaluations per frame at an editing step: the edit branches, plus the pipeline's source branch
        when ``source`` (the editor or the propagator reads it) unless the editor runs its own. The memory
        estimate reads it before anything is prepared. Default: uncond + cond on a classifier-free model, one
        branch on a guidance-distilled one (FLUX.1)."""
        return (2 if getattr(model, "classifier_free", True) else 1) + int(source)

    def timesteps(self, grid: list[int]) -> list[int]:
        """The timesteps this editor denoises through (SDEdit starts part-way)."""
        return grid

    def initial_latents(self, inputs: EditInputs, timesteps: list[int]) -> Tensor:
        """Latents to start from, (N, C, h, w): by default the inverted latents at the first timestep."""
        return inputs.inversion.at(timesteps[0]).clone()

    def self_attention(self, layer: str, q: Tensor, k: Tensor, v: Tensor, step: Step) -> tuple[Tensor, Tensor, Tensor]:
        """Change self-attention queries/keys/values, each (B, F, S, C) by branch; default: unchanged."""
        return q, k, v

    def install(self, unet: torch.nn.Module, layout, step_ref: Callable[[], Step | None]) -> list:
        """Install extra hooks; return handles with ``.remove()``. ``step_ref()`` gives the current Step."""
        return []

    def step_end(self, latents: Tensor, step: Step) -> Tensor:
        """Adjust the new latents of the frames just stepped (e.g. P2P local blending); default unchanged."""
        return latents

    @property
    def guidance_weight(self) -> float | None:
        """The guidance weight this editor applies, if any (named when a run's latents turn non-finite)."""
        return None


class WrappingEditor(KeyframeEditor):
    """An editor that adds to a ``base`` editor (e.g. ControlNet residuals on PnP): every part of the interface a
    subclass does not override is the base's. The forwarding is written once, here, for the whole
    :class:`KeyframeEditor` interface (tests/test_controlnet.py checks that no method is left out)."""

    base: KeyframeEditor

    @property
    def needs_source(self) -> bool:  # type: ignore[override]
        return self.base.needs_source

    @property
    def needs_inversion(self) -> bool:  # type: ignore[override]
        return self.base.needs_inversion

    def prepare(self, inputs: EditInputs) -> None:
        self.base.prepare(inputs)

    def branches(self, step: Step) -> list[Branch]:
        return self.base.branches(step)

    def guide(self, eps: dict[str, Tensor], step: Step) -> Tensor:
        return self.base.guide(eps, step)

    def check(self, model) -> None:
        self.base.check(model)

    def source_settings(self) -> dict[str, Any] | None:
        return self.base.source_settings()

    def source_branch(self, branch: Branch) -> Branch:
        return self.base.source_branch(branch)

    def branch_count(self, model, source: bool) -> int:
        return self.base.branch_count(model, source)

    def timesteps(self, grid: list[int]) -> list[int]:
        return self.base.timesteps(grid)

    def initial_latents(self, inputs: EditInputs, timesteps: list[int]) -> Tensor:
        return self.base.initial_latents(inputs, timesteps)

    def self_attention(self, layer: str, q: Tensor, k: Tensor, v: Tensor, step: Step) -> tuple[Tensor, Tensor, Tensor]:
        return self.base.self_attention(layer, q, k, v, step)

    def install(self, unet: torch.nn.Module, layout, step_ref: Callable[[], Step | None]) -> list:
        return self.base.install(unet, layout, step_ref)

    def step_end(self, latents: Tensor, step: Step) -> Tensor:
        return self.base.step_end(latents, step)

    @property
    def guidance_weight(self) -> float | None:
        return self.base.guidance_weight


FAMILY_NAMES = {"unet": "an SD UNet (1.x/2.x/XL)", "mmdit": "an MMDiT transformer (SD 3/3.5, FLUX.1)"}


def check_pairing(editor: KeyframeEditor, model: Any, sampler: Any) -> None:
    """Refuse, in one line naming both and the fix, an editor paired with a backbone or sampler it cannot drive."""
    family = getattr(model, "family", "unet")
    name = type(editor).__name__
    if editor.families is not None and family not in editor.families:
        drives = " or ".join(FAMILY_NAMES.get(f, f) for f in editor.families)
        raise ConfigError(f"{name} drives {drives}, not '{getattr(model, 'identity', model)}' "
                          f"({FAMILY_NAMES.get(family, family)}) — on this model use editor=sdedit or editor=kv_injection")
    if editor.samplers is not None and sampler.name not in editor.samplers:
        raise ConfigError(f"{name} works with the {' or '.join(editor.samplers)} sampler, not {sampler.name} — pick an "
                          "editor for this model's sampler (editor=sdedit works with every sampler)")
