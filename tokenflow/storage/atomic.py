"""Publish files atomically: write beside the destination, check, flush to disk, rename over it.

A reader (or a later run) sees the old file, or the whole new one, never a half-written one; a
failure at any point (an exception, a full disk, a kill) leaves no partial file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"  # every temporary file's name starts with "." and contains this


def temp_path(dest: Path, suffix: str = "") -> Path:
    """A fresh hidden temporary name in ``dest``'s folder (same file system, so the rename is atomic)."""
    return dest.with_name(f".{dest.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, suffix: str = "", check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success ``check`` it, fsync it and rename it over ``dest``.

    ``suffix``: the temporary name's ending (e.g. ``.mp4`` so a writer picks the container by name).
    ``check(tmp)`` raises if the written file is incomplete; then nothing is published.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest, suffix)
    try:
        yield tmp
        if not tmp.is_file():
            raise OSError(f"nothing was written to {tmp}")
        if check is not None:
            check(tmp)
        _fsync(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (non-JSON numbers like numpy floats become floats)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    return Path(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)
