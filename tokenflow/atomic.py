"""Publish files and folders atomically: write beside the destination, check, flush to disk, rename over it.

A reader (or a later run) sees the old file, or the whole new one, never a half-written one; a
failure at any point (an exception, a full disk, a kill) leaves no partial file under the final name.
Temporary names record their owner (``.<name>.tmp-<host>-<pid>-<random>``) so that the leftovers of a
killed process can be told from the work in progress of a running one (:func:`remove_stale`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)
TEMP_MARK = ".tmp-"  # every temporary file's name starts with "." and contains this
_OWNED = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_.]*)-(?P<pid>\d+)-[0-9a-f]{12}(\.\w+)?$")
_UNOWNED = re.compile(r"^\.(tiny-.+|.+\.tmp-\d+-[0-9a-f]{12}(\.\w+)?)$")  # older versions' names: mkdtemp's .tiny-*


def host_name() -> str:
    """This machine's name as it appears in temporary names (letters, digits, ``_`` and ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def temp_path(dest: Path, suffix: str = "") -> Path:
    """A fresh hidden temporary name in ``dest``'s folder (same file system, so the rename is atomic)."""
    return dest.with_name(f".{dest.name}{TEMP_MARK}{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading only if it is a regular file: a FIFO or device in its place (which a plain
    ``open`` would block on forever, or read without end) raises ``NotRegularFileError``; a missing file raises
    FileNotFoundError as ``open`` does. Opened non-blocking, checked with ``fstat``, then made blocking again."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{path} is not a regular file (mode {stat.filemode(mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """The tensors of a safetensors file the library wrote, read through :func:`open_regular` (never a FIFO)."""
    from safetensors.torch import load

    with open_regular(path) as fh:
        return load(fh.read())


class NotRegularFileError(OSError):
    """A FIFO, socket or device where a data file the library wrote should be."""


@contextlib.contextmanager
def naming_failures(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised inside the block without a file name (a buffered write's ``close()`` on a full
    disk: ``[Errno 28] No space left on device``) the name ``path``, so the user learns which file did not fit."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


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
        with naming_failures(dest):
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


class AtomicWriter(ABC):
    """A writer that publishes its output whole: as a context manager, ``close()`` (publish) when the block ends
    normally, ``abort()`` (publish nothing) when it raises."""

    @abstractmethod
    def close(self) -> Any: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class StagedDir:
    """A temporary folder beside ``dest`` to fill: :meth:`publish` renames it to ``dest``, :meth:`discard` removes it.

    ``dest`` must not exist (FileExistsError, at staging and at publishing), unless ``replace_empty``: then an empty
    folder there is replaced, and a non-empty one makes :meth:`publish` fail with OSError.
    """

    def __init__(self, dest: str | os.PathLike, replace_empty: bool = False) -> None:
        self.dest, self.replace_empty = Path(dest), replace_empty
        if self.dest.exists() and not replace_empty:
            raise FileExistsError(f"{self.dest} exists — write into a new folder")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.path = temp_path(self.dest)
        self.path.mkdir()

    def publish(self) -> Path:
        if not self.replace_empty and self.dest.exists():
            raise FileExistsError(f"{self.dest} appeared while it was written — write into a new folder")
        os.replace(self.path, self.dest)
        return self.dest

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, replace_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success rename it to ``dest`` (see :class:`StagedDir`)."""
    staged = StagedDir(dest, replace_empty)
    try:
        yield staged.path
        staged.publish()
    finally:
        staged.discard()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (non-JSON numbers like numpy floats become floats)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable, ensure_ascii=False), encoding="utf-8")
    return Path(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)


# ---- leftovers of killed processes -------------------------------------------------------------------
def is_stale(path: Path, oldest_owner_start: float | None = None) -> bool:
    """Whether the temporary entry ``path`` belongs to no running process.

    A name that records its owner (this host's pid) is stale when that process is gone, or when the
    process now holding the pid started after the entry was last written (a reused pid). An entry
    without an owner (an older version's ``mkdtemp`` staging folder) is stale when it was last written before
    ``oldest_owner_start``, the start of the oldest running process that could own it. Entries of
    other hosts are never stale here (their processes cannot be seen).
    """
    import psutil

    touched = _newest_mtime(path)
    if touched is None:
        return False
    owned = _OWNED.match(path.name)
    if owned:
        if owned["host"] != host_name():
            return False
        try:
            started = psutil.Process(int(owned["pid"])).create_time()
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False
        return started > touched + 1.0
    if _UNOWNED.match(path.name):
        return oldest_owner_start is not None and touched < oldest_owner_start - 1.0
    return False


def remove_stale(folder: str | os.PathLike, depth: int = 1) -> list[Path]:
    """Delete stale temporary files and staging folders in ``folder`` (and ``depth - 1`` levels below).

    Only names this library creates for temporaries are considered (see :func:`is_stale`); anything
    else is left alone. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = list(_candidates(folder, depth))
    unowned = any(not _OWNED.match(p.name) for p in candidates)
    start = oldest_possible_owner() if unowned else None  # a scan of all processes: only when needed
    removed = []
    for path in candidates:
        if is_stale(path, start):
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed.append(path)
    if removed:
        log.info("removed %d leftover temporary file(s) of killed runs in %s", len(removed), folder)
    return removed


def oldest_possible_owner() -> float | None:
    """Start time of the oldest running Python process of this user (a possible owner of unnamed temporaries)."""
    import psutil

    me = os.getuid() if hasattr(os, "getuid") else None
    starts = []
    for proc in psutil.process_iter(["uids", "name", "cmdline", "create_time"]):
        info = proc.info
        if me is not None and info.get("uids") is not None and info["uids"].real != me:
            continue
        text = " ".join([info.get("name") or ""] + list(info.get("cmdline") or []))
        if "python" in text or "tokenflow" in text:
            starts.append(info["create_time"])
    return min(starts) if starts else None


def _candidates(folder: Path, depth: int) -> Iterator[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") and (_OWNED.match(entry.name) or _UNOWNED.match(entry.name)):
            yield entry
        elif depth > 1 and entry.is_dir() and not entry.is_symlink():
            yield from _candidates(entry, depth - 1)


def _newest_mtime(path: Path) -> float | None:
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    with contextlib.suppress(OSError):
                        newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
        return newest
    except OSError:
        return None
