"""One video across several processes (``torch.distributed``): who computes which frames, and the merge.

Every rank runs the keyframe pass (or the anchors pass) itself — the same computation on the same
inputs — and its share of the chunk passes (chunks, or segments with ``attention.context=anchors``, go
round-robin); each frame has exactly one owner, the others leave it at zero, and one ``all_reduce``
(sum) per step gives every rank all new latents. Calls are formed exactly as in a single process, so
the result is identical to it. Launch with ``torchrun --nproc-per-node N`` (or ``accelerate launch``):
gloo on CPU, NCCL on GPUs (one per process, ``LOCAL_RANK``).

The inversion splits the same way (:func:`invert_split`): an inverter that can skip frame chunks
(:func:`splits_frames`: ``invert_into(..., owns=)``, e.g. :class:`~tokenflow.core.inversion.DDIMInverter`)
inverts the chunks it would in one process, round-robin among ranks, and the trajectory is merged one
timestep's slab at a time. A collective that fails because another rank stopped raises
:class:`RankStopped`, one line.
"""
from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenflow.errors import TokenFlowError
from tokenflow.models.trajectory import Frames, Trajectory

log = logging.getLogger(__name__)


class RankStopped(TokenFlowError):
    """A collective failed, almost always because another process of the group stopped (its error is its own)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes editing one video (``world == 1``: a single process)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """The initialised ``torch.distributed`` group's rank and size, else a single process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @classmethod
    def from_environment(cls) -> "Ranks":
        """The rank and size a launcher (``torchrun``) gives this process in ``RANK``/``WORLD_SIZE``, before
        joining the group (a single process without them)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world) if world > 1 else cls()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes outputs."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """``"rank r of w"``, for log and error lines (empty for a single process)."""
        return f"rank {self.rank} of {self.world}" if self.distributed else ""

    def owns(self, item: int) -> bool:
        """Whether work item ``item`` (a chunk or segment number) is this rank's: round-robin."""
        return item % self.world == self.rank

    def merge(self, out: Tensor, owned: Tensor) -> Tensor:
        """Every rank's owned rows of ``out`` (N, ...) together: the others are zeroed, then summed over ranks."""
        if not self.distributed:
            return out
        import torch.distributed as dist

        mask = owned.view(-1, *([1] * (out.dim() - 1))).to(out.device)
        merged = torch.where(mask, out, torch.zeros_like(out))
        device = _collective_device()
        buffer = merged.to(device)
        self._collective(dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
        return buffer.to(out.device)

    def barrier(self) -> None:
        """Wait for every rank (a rank that stopped never arrives: :class:`RankStopped`, or the launcher ends
        this process)."""
        if self.distributed:
            import torch.distributed as dist

            self._collective(dist.barrier)

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        buffer = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device())
        self._collective(dist.broadcast, buffer, src=0)
        return bool(buffer.item())

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        buffer = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device())
        self._collective(dist.all_reduce, buffer, op=dist.ReduceOp.MIN)
        return bool(buffer.item())

    def gather(self, value: float) -> list[float]:
        """Every rank's ``value``, by rank."""
        if not self.distributed:
            return [float(value)]
        import torch.distributed as dist

        buffer = torch.zeros(self.world, dtype=torch.float64, device=_collective_device())
        buffer[self.rank] = float(value)
        self._collective(dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
        return [float(v) for v in buffer.cpu()]

    def _collective(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run one collective; its failure (a peer that stopped: the connection closed) as a :class:`RankStopped`."""
        try:
            call(*args, **kwargs)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
            raise RankStopped(f"{self.label}: another process of the group stopped ({first[:160]}) — its own error "
                              "line says why; nothing was published") from e


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors (this process's GPU); gloo reduces CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_environment() -> Ranks:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the environment.

    Does nothing for a single process (no ``WORLD_SIZE`` > 1). Picks NCCL when CUDA is available (and
    selects the GPU ``LOCAL_RANK``), gloo otherwise.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Ranks.current()


def leave_group() -> None:
    """Leave the process group :func:`init_from_environment` joined (nothing when none is initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def splits_frames(inverter: Any) -> bool:
    """Whether ``inverter.invert_into`` can skip frame chunks (takes ``owns=``), so ranks can share its work."""
    try:
        return "owns" in inspect.signature(inverter.invert_into).parameters
    except (TypeError, ValueError):
        return False


class OwnedRows(Trajectory):
    """A trajectory store that records which frames were written into it (a rank's share of an inversion)."""

    def __init__(self, store: Trajectory) -> None:
        self.store, self.shape, self.dtype = store, store.shape, store.dtype
        self.owned = torch.zeros(store.shape[1], dtype=torch.bool)

    def read(self, i: int, frames: Frames = None) -> Tensor:
        return self.store.read(i, frames)

    def write(self, i: int, start: int, rows: Tensor) -> None:
        self.store.write(i, start, rows)
        self.owned[start : start + len(rows)] = True


def invert_split(inverter: Any, model: Any, clean: Tensor, prompt: str, store: Trajectory, ranks: Ranks,
                 copies: Sequence[Trajectory] = (), progress: bool = True) -> tuple[Any, int]:
    """Invert this rank's frame chunks into ``store`` (T, N, C, h, w), then merge every rank's rows slab by slab
    into ``store`` and ``copies`` (one (N, C, h, w) slab in RAM at a time). Returns (the inverter's result, the
    number of frames this rank inverted). ``inverter`` must :func:`split <splits_frames>`."""
    rows = OwnedRows(store)
    result = inverter.invert_into(model, clean, prompt, rows, progress=progress, owns=ranks.owns)
    mine = int(rows.owned.sum())
    log.info("inversion split by frame chunks: %s inverted %d of %d frames", ranks.label, mine, clean.shape[0])
    for i in range(store.shape[0]):
        slab = ranks.merge(store.read(i), rows.owned)
        for target in (store, *copies):
            target.write(i, 0, slab)
    return result, mine
