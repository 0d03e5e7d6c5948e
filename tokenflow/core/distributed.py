"""One video across several processes (``torch.distributed``): who computes which frames, and the merge.

Every rank runs the keyframe pass (or the anchors pass) itself — the same computation on the same
inputs — and its share of the chunk passes (chunks, or segments with ``attention.context=anchors``, go
round-robin); each frame has exactly one owner, the others leave it at zero, and one ``all_reduce``
(sum) per step gives every rank all new latents. Calls are formed exactly as in a single process, so
the result is identical to it. Launch with ``torchrun --nproc-per-node N`` (or ``accelerate launch``):
gloo on CPU, NCCL on GPUs (one per process, ``LOCAL_RANK``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


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

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes outputs."""
        return self.rank == 0

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
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.to(out.device)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


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
