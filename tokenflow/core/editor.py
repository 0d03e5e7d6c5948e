"""The ``KeyframeEditor`` interface: what an image-editing method contributes to each denoising step.

An editor names the conditioning branches of its UNet batch (e.g. PnP: negative prompt and target
prompt, on top of the pipeline's source branch), may change self-attention Q/K/V and install its own
hooks (feature injection, cross-attention control), and turns the branches' noise predictions into
the noise for the DDIM step (guidance). It never sees keyframes or propagation: the pipeline and the
propagator handle those, so any image editor works with TokenFlow.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tokenflow.models.trajectory import InversionResult

SOURCE = "source"  # name of the branch that carries the inverted source video


@dataclass(frozen=True)
class Branch:
    """One conditioning branch of the UNet batch.

    embedding: (1, L, D) text embedding shared by all frames, or (N, L, D) one per frame of the video
    (e.g. null-text embeddings), indexed by the frames of each UNet call. latents: ``"edit"`` (the
    latents being edited) or ``"source"`` (the inverted source latents at the current timestep).
    joint: keyframes of this branch attend to each other (extended self-attention); the source branch
    stays per-frame.
    """

    name: str
    embedding: Tensor
    latents: str = "edit"
    joint: bool = True


@dataclass
class Step:
    """What the hooks may read about the UNet call in progress."""

    index: int                 # 0-based position in the editing schedule
    timestep: int
    n_steps: int
    phase: str                 # "keyframes" | "propagate" | "frames"
    frames: Tensor             # global indices of the frames in this call (F,)
    keyframes: Tensor          # global keyframe indices at this step (K,), empty without keyframes
    branches: tuple[Branch, ...] = field(default_factory=tuple)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    def index_of(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    @property
    def progress(self) -> float:
        """Fraction of the schedule already done, 0 at the first step."""
        return self.index / self.n_steps


@dataclass
class EditInputs:
    """What an editor is prepared with before the loop."""

    model: Any                 # tokenflow.models.loading.DiffusionModel
    inversion: InversionResult
    prompt: str
    negative_prompt: str
    inversion_prompt: str
    timesteps: list[int]       # the full sampling grid, noisiest first


class KeyframeEditor(ABC):
    """Base class of image-editing backends (PnP, SDEdit, Prompt-to-Prompt, your own)."""

    #: the editor reads the source branch (feature injection); the pipeline then always runs it
    needs_source: bool = False

    @abstractmethod
    def prepare(self, inputs: EditInputs) -> None:
        """Encode prompts and precompute schedules for one run."""

    @abstractmethod
    def branches(self, step: Step) -> list[Branch]:
        """The edit branches of the UNet batch at this step (the pipeline adds the source branch)."""

    @abstractmethod
    def guide(self, eps: dict[str, Tensor], step: Step) -> Tensor:
        """Noise predictions by branch name (F, 4, h, w) → the noise used for the DDIM step."""

    def timesteps(self, grid: list[int]) -> list[int]:
        """The timesteps this editor denoises through (SDEdit starts part-way)."""
        return grid

    def initial_latents(self, inputs: EditInputs, timesteps: list[int]) -> Tensor:
        """Latents to start from, (N, 4, h, w): by default the inverted latents at the first timestep."""
        return inputs.inversion.at(timesteps[0]).clone()

    def self_attention(self, layer: str, q: Tensor, k: Tensor, v: Tensor, step: Step) -> tuple[Tensor, Tensor, Tensor]:
        """Change self-attention queries/keys/values, each (B, F, S, C) by branch; default: unchanged."""
        return q, k, v

    def install(self, unet: torch.nn.Module, layout, step_ref) -> list:
        """Install extra hooks; return handles with ``.remove()``. ``step_ref()`` gives the current Step."""
        return []

    def step_end(self, latents: Tensor, step: Step) -> Tensor:
        """Adjust the new latents of the frames just stepped (e.g. P2P local blending); default unchanged."""
        return latents
