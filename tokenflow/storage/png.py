"""Write frames as PNG files ``00000.png, 00001.png, ...``: a new folder appears whole, or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from tokenflow.atomic import AtomicWriter, StagedDir, atomic_file, naming_failures
from tokenflow.storage.frames import check_frames


def write_frames(folder: str | os.PathLike, frames: np.ndarray) -> list[Path]:
    """Write (N, H, W, 3) uint8 frames as ``00000.png, 00001.png, ...`` (each atomically).

    A new ``folder`` is filled under a temporary name and renamed when complete; in an existing one,
    other files are left alone (use a new folder to read the frames back).
    """
    check_frames(frames, "frames")
    with FrameWriter(folder) as out:
        out.write(frames)
    return [out.folder / f"{i:05d}.png" for i in range(len(frames))]


class FrameWriter(AtomicWriter):
    """Write PNG frames ``00000.png, 00001.png, ...`` chunk by chunk (a context manager, like :class:`VideoWriter`).

    A new ``folder`` is filled under a temporary name and renamed when the block ends normally: it
    appears whole or not at all. In an existing folder each frame is written atomically in place (as
    :func:`write_frames`).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder, self.n_frames = Path(folder), 0
        self._fresh = not self.folder.exists()
        self._staged: StagedDir | None = None

    def __enter__(self) -> "FrameWriter":
        if self._fresh:
            self._staged = StagedDir(self.folder)
        return self

    def write(self, frames: np.ndarray) -> None:
        """Append (F, H, W, 3) uint8 frames."""
        check_frames(frames, "frames")
        for frame in frames:
            name = f"{self.n_frames:05d}.png"
            if self._staged is not None:
                with naming_failures(self.folder / name):  # PIL's close() drops the name of a file that did not fit
                    Image.fromarray(np.ascontiguousarray(frame)).save(self._staged.path / name, format="PNG")
            else:
                with atomic_file(self.folder / name) as tmp:
                    Image.fromarray(np.ascontiguousarray(frame)).save(tmp, format="PNG")
            self.n_frames += 1

    def close(self) -> Path:
        """Publish a new folder under ``folder`` (FileExistsError, and nothing published, if one appeared meanwhile)."""
        if self._staged is not None:
            try:
                self._staged.publish()
            finally:
                self.abort()
        return self.folder

    def abort(self) -> None:
        """Remove a new folder's frames: nothing is published."""
        if self._staged is not None:
            self._staged.discard()
            self._staged = None
