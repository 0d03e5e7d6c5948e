"""The inversion of a video: the latent of every frame at every kept timestep (data types, no computation).

The trajectory (T, N, C, h, w) grows with steps x frames, so it sits behind a small store interface:
:class:`TensorTrajectory` holds it in RAM (tests, small clips, Python users passing a tensor) and
:class:`FileTrajectory` keeps it in a file (the inversion cache entry, or an anonymous temporary file)
read one timestep's slab at a time with ``os.preadv`` into the returned tensor. Plain reads, not a
memory map: mapped file pages count in the process's RSS and keep growing as the edit visits every
step, while read pages stay in the kernel's page cache (reclaimable, not the process's).
"""
from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from typing import Any, BinaryIO, Sequence

import torch
from torch import Tensor

from tokenflow.errors import ConfigError, StorageError

Frames = Tensor | Sequence[int] | None


class NullTextEmbeddings:
    """Null-text inversion's optimised unconditional embeddings (Mokady et al. 2023), one per frame and step.

    ``table``: (T, N, L, D) float32 — a tensor, or a :class:`Trajectory` store of shape (T, N, 1, L, D) (a file
    read one step at a time, so a long clip's T x N table never sits in RAM); step ``i`` belongs to the
    inversion's ``timesteps[i]``. guidance_scale: the classifier-free guidance weight they were optimised for
    (sampling at another weight drifts). pooled: (1, P) the empty prompt's pooled embedding for SDXL (held
    fixed), else None.
    """

    def __init__(self, table: "Tensor | Trajectory", guidance_scale: float, pooled: Tensor | None = None) -> None:
        if isinstance(table, Tensor):
            if table.ndim != 4:
                raise ConfigError(f"a null-text table is (T, N, L, D), got shape {tuple(table.shape)}")
            table = TensorTrajectory(table.unsqueeze(2))
        if len(table.shape) != 5 or table.shape[2] != 1:
            raise ConfigError(f"a null-text store is (T, N, 1, L, D), got shape {tuple(table.shape)}")
        self.store: Trajectory = table
        self.guidance_scale, self.pooled = float(guidance_scale), pooled

    @property
    def shape(self) -> tuple[int, int, int, int]:
        t, n, _, length, d = self.store.shape
        return (t, n, length, d)

    def step(self, i: int, frames: "Frames" = None) -> Tensor:
        """The embeddings of step ``i``, (N, L, D) — or of ``frames`` only, (F, L, D) — float32 on CPU."""
        return self.store.read(i, frames).squeeze(1)

    @property
    def table(self) -> Tensor:
        """The whole (T, N, L, D) table in RAM (every step is read: for small clips and tests)."""
        return self.store.tensor().squeeze(2)

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return f"NullTextEmbeddings(shape={self.shape}, guidance_scale={self.guidance_scale}, store={type(self.store).__name__})"


class Trajectory(ABC):
    """Latents (T, N, C, h, w): ``read(i, frames)`` one timestep's slab (or some of its frames), ``write``
    rows of a slab as they are computed."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @abstractmethod
    def read(self, i: int, frames: Frames = None) -> Tensor:
        """Slab ``i`` (N, C, h, w), or its rows ``frames`` (F, C, h, w), on CPU."""

    @abstractmethod
    def write(self, i: int, start: int, rows: Tensor) -> None:
        """Store ``rows`` (F, C, h, w) as frames ``start .. start + F - 1`` of slab ``i``."""

    def tensor(self) -> Tensor:
        """The whole trajectory (T, N, C, h, w) in RAM (every slab is read: for small clips and tests)."""
        return torch.stack([self.read(i) for i in range(self.shape[0])])

    def close(self) -> None:
        """Release what the store holds open (nothing for a tensor)."""

    @property
    def slab_bytes(self) -> int:
        return _numel(self.shape[1:]) * _itemsize(self.dtype)


class TensorTrajectory(Trajectory):
    """A trajectory held in RAM as one (T, N, C, h, w) tensor; reads are views or row selections of it."""

    def __init__(self, latents: Tensor) -> None:
        if latents.ndim != 5:
            raise ConfigError(f"inversion latents must be (T, N, C, h, w), got shape {tuple(latents.shape)} — stack "
                              "the per-timestep (N, C, h, w) latents along a first dimension")
        self.latents, self.shape, self.dtype = latents, tuple(latents.shape), latents.dtype

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> "TensorTrajectory":
        return cls(torch.empty(shape, dtype=dtype))

    def read(self, i: int, frames: Frames = None) -> Tensor:
        x = self.latents[i]
        return x if frames is None else x[frames]

    def write(self, i: int, start: int, rows: Tensor) -> None:
        self.latents[i, start : start + len(rows)] = rows

    def tensor(self) -> Tensor:
        return self.latents


class FileTrajectory(Trajectory):
    """A trajectory stored contiguously, slab after slab, at byte ``offset`` of an open binary file.

    Reads and writes are positional (``os.preadv``/``os.pwritev``) straight into/out of the tensors'
    memory: nothing of the file is mapped or cached by this process. ``bytes_read`` counts what reads
    asked of the file. ``channels_last``: reads return channels-last tensors (the layout the latents had
    when saved, so a loaded inversion runs through the same kernels as the computed one).
    """

    def __init__(self, file: BinaryIO, offset: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 channels_last: bool = False) -> None:
        if len(shape) != 5:
            raise ConfigError(f"a trajectory is (T, N, C, h, w), got shape {tuple(shape)}")
        self.file, self.offset, self.shape, self.dtype = file, int(offset), tuple(int(s) for s in shape), dtype
        self.channels_last = channels_last
        self.bytes_read = 0
        self.temp_folder: str | None = None  # set for an anonymous temporary file: named when a write fails
        self.temp_from_env = False  # whether ``temp_folder`` is the system's ($TMPDIR) rather than one given

    @classmethod
    def temporary(cls, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                  folder: str | os.PathLike | None = None) -> "FileTrajectory":
        """In an anonymous file (no name: gone when closed or when the process dies) in ``folder``
        (default: the system's temporary folder, ``$TMPDIR``). A write that fails (a full disk) raises a
        :class:`~tokenflow.errors.StorageError` naming the folder, the size needed and the fix."""
        where, from_env = str(folder if folder is not None else tempfile.gettempdir()), folder is None
        store = None
        try:
            fh = tempfile.TemporaryFile(dir=folder)
            store = cls(fh, 0, shape, dtype)
            store.temp_folder, store.temp_from_env = where, from_env
            fh.truncate(store.nbytes)
        except OSError as e:
            if store is not None:
                store.close()
            raise _temp_full(where, from_env, _numel(shape) * _itemsize(dtype), e) from e
        return store

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.slab_bytes

    def _row(self, i: int, frame: int) -> int:
        """Byte offset in the file of frame ``frame`` of slab ``i``."""
        if not (0 <= i < self.shape[0] and 0 <= frame <= self.shape[1]):
            raise IndexError(f"slab {i}, frame {frame} is outside a trajectory of shape {self.shape}")
        return self.offset + i * self.slab_bytes + frame * (self.slab_bytes // self.shape[1])

    def read(self, i: int, frames: Frames = None) -> Tensor:
        n = self.shape[1]
        index = list(range(n)) if frames is None else [int(f) for f in torch.as_tensor(frames).reshape(-1).tolist()]
        index = [f + n if f < 0 else f for f in index]
        out = torch.empty((len(index), *self.shape[2:]), dtype=self.dtype)
        buffer = _bytes(out)
        row = len(buffer) // max(1, len(index))
        j = 0
        while j < len(index):  # one read per run of consecutive frames
            k = j + 1
            while k < len(index) and index[k] == index[k - 1] + 1:
                k += 1
            self._pread(buffer[j * row : k * row], self._row(i, index[j]))
            j = k
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def write(self, i: int, start: int, rows: Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        if start < 0 or start + len(rows) > self.shape[1] or tuple(rows.shape[1:]) != self.shape[2:]:
            raise IndexError(f"rows {tuple(rows.shape)} at frame {start} do not fit a trajectory of shape {self.shape}")
        view, at = _bytes(rows), self._row(i, start)
        try:
            while len(view):
                written = os.pwritev(self.file.fileno(), [view], at)
                view, at = view[written:], at + written
        except OSError as e:
            if self.temp_folder is None:
                raise
            raise _temp_full(self.temp_folder, self.temp_from_env, self.nbytes, e) from e

    def _pread(self, buffer: memoryview, at: int) -> None:
        want = len(buffer)
        while len(buffer):
            got = os.preadv(self.file.fileno(), [buffer], at)
            if got == 0:
                raise OSError(f"the trajectory file ends before byte {at + len(buffer)} (truncated?)")
            buffer, at = buffer[got:], at + got
        self.bytes_read += want

    def close(self) -> None:
        self.file.close()


class TeeTrajectory(Trajectory):
    """Writes go to every store, reads come from the first (e.g. a run's private file and a cache entry
    being written, so that what the run reads does not depend on the published entry)."""

    def __init__(self, first: Trajectory, *others: Trajectory) -> None:
        if any(tuple(o.shape) != tuple(first.shape) for o in others):
            raise ConfigError("the stores of a TeeTrajectory must have one shape")
        self.stores, self.shape, self.dtype = (first, *others), first.shape, first.dtype

    def read(self, i: int, frames: Frames = None) -> Tensor:
        return self.stores[0].read(i, frames)

    def write(self, i: int, start: int, rows: Tensor) -> None:
        for store in self.stores:
            store.write(i, start, rows)


def as_trajectory(latents: Tensor | Trajectory) -> Trajectory:
    return latents if isinstance(latents, Trajectory) else TensorTrajectory(latents)


class InversionResult:
    """Latents of every frame at every kept timestep.

    timesteps: kept timesteps, noisiest first (e.g. 981, ..., 1, optionally 999 in front).
    latents: a (T, N, 4, h, w) float32 tensor or a :class:`Trajectory` store, slab ``i`` at ``timesteps[i]``;
    kept as ``trajectory`` (the ``latents`` property reads the whole of it: use :meth:`at` for one step).
    clean: (N, 4, h, w) the encoded frames z0.
    null_text: the null-text embeddings when the inverter optimised them (editors then use them as the
    unconditional branch), else None.
    extras: further per-timestep tensors a custom inverter adds, name → (T, ...).
    """

    def __init__(self, timesteps: list[int], latents: Tensor | Trajectory, clean: Tensor, prompt: str,
                 settings: dict[str, Any], null_text: NullTextEmbeddings | None = None,
                 extras: dict[str, Tensor] | None = None) -> None:
        self.timesteps, self.trajectory, self.clean = list(timesteps), as_trajectory(latents), clean
        self.prompt, self.settings, self.null_text = prompt, settings, null_text
        self.extras = {} if extras is None else extras

    @classmethod
    def clean_only(cls, clean: Tensor, prompt: str) -> "InversionResult":
        """The encoded frames without a trajectory: what an inversion-free editor (FlowEdit) starts from."""
        return cls([], torch.empty(0, *clean.shape), clean, prompt, {"inverter": "none"})

    @property
    def latents(self) -> Tensor:
        """The whole trajectory (T, N, 4, h, w) (read from the store: T x N latents in RAM)."""
        return self.trajectory.tensor()

    def at(self, t: int | float, frames: Frames = None) -> Tensor:
        """Latents at timestep ``t`` (N, C, h, w), optionally only ``frames`` (one slab read for a stored trajectory).
        ``t`` is a model timestep as the sampler's grid gives it (DDIM: an integer; flow matching: σ·T, a float)."""
        try:
            i = self.timesteps.index(_timestep(t))
        except ValueError:
            raise ConfigError(
                f"the inversion holds no latent at t={_timestep(t)} (it kept {len(self.timesteps)} timesteps "
                f"{self.timesteps[0]}..{self.timesteps[-1]}) — invert with keep_steps equal to the editor's n_steps") from None
        return self.trajectory.read(i, frames)

    def has(self, t: int | float) -> bool:
        return _timestep(t) in self.timesteps

    @property
    def n_frames(self) -> int:
        return self.clean.shape[0]

    def __repr__(self) -> str:
        return (f"InversionResult(timesteps={self.timesteps[:3]}..({len(self.timesteps)}), "
                f"trajectory={type(self.trajectory).__name__}{self.trajectory.shape}, prompt={self.prompt!r})")


def _temp_full(folder: str, from_env: bool, nbytes: int, error: OSError) -> StorageError:
    """The one line for a temporary trajectory file that cannot be written in ``folder`` (``from_env``: the
    system's temporary folder, ``$TMPDIR``, rather than one the caller chose)."""
    where, fix = ((f"{folder} ($TMPDIR)", "set TMPDIR= to a folder on a disk with room") if from_env
                  else (folder, "give a temporary folder on a disk with room"))
    return StorageError(f"cannot write the inversion trajectory ({nbytes / 2**20:.1f} MiB) in the temporary folder "
                        f"{where}: {error.strerror or error} — free space there or {fix}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(bytearray())


def _timestep(t: Any) -> int | float:
    """A timestep as a Python number (a 0-d tensor or numpy scalar read out; never truncated)."""
    return t.item() if hasattr(t, "item") else t
