"""Content-addressed inversion cache: one safetensors file per key, written atomically, verified on load.

The key hashes the frames' pixels (so the video bytes, the frames selected and the size), the model
fingerprint (its weights' content, not their folder), the inverter settings and the inversion prompt:
an edit or a sweep never inverts the same video twice, and a changed input never hits a stale entry.
The checksum covers everything a load returns, the tensors and the manifest (timesteps, prompt,
settings, ...): a damaged or edited file (truncated, bit flip, swapped header values, foreign) fails
it and is recomputed, never loaded. The cache is an optimisation: a folder that cannot be written
(read-only, full) is reported once per entry and the run goes on without it.

The entry file is also where the inversion's trajectory lives during a run: :meth:`InversionCache.writer`
opens the entry under a temporary name, the inverter writes each timestep's latents into it as they are
computed (the data section starts at a fixed offset, the header is written last), and ``publish`` adds
the rest, checks, flushes and renames it. A load verifies the whole file by streaming it through the
checksum, then keeps it open and hands the trajectory out as a :class:`FileTrajectory` read one slab
per step (the file's content cannot change under it: entries are only ever replaced by a rename).

Processes that share the folder and miss the same key at once compute it once: :meth:`InversionCache.lock`
holds an advisory ``flock`` on ``locks/<key>.lock`` while one computes, the others wait, then hit.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import stat
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file

from tokenflow.models.trajectory import FileTrajectory, InversionResult, NullTextEmbeddings, Trajectory
from tokenflow.atomic import atomic_file, open_regular, remove_stale, temp_path
from tokenflow.digests import json_digest

try:
    import fcntl
except ImportError:  # Windows: no flock, concurrent runs may compute the same entry (each publish is still atomic)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
LOCK_PATIENCE = 1.0  # seconds a lock may be busy before the wait is logged
LOCK_POLL = 0.05  # seconds between tries while a lock is busy
NULL_TABLE = "null_text.table"  # (T, N, L, D) float32, the last tensor of an entry's data section
CACHE_FORMAT = 3  # 3: checksum over tensors and manifest, tensor layouts kept
HEADER_ROOM = 64 << 10  # bytes reserved for the header of an entry written while inverting (data starts after)
READ_CHUNK = 16 << 20  # bytes per read when verifying an entry (bounded memory whatever its size)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}


def cache_key(**parts: Any) -> str:
    """Stable hash of JSON-serialisable parts."""
    return json_digest({"format": CACHE_FORMAT, **parts}, 32)


def _checksum(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and of the manifest without its checksum."""
    return _checksum_parts({name: (t.dtype, tuple(t.shape), _tensor_bytes(t)) for name, t in tensors.items()},
                           manifest)


def _checksum_parts(parts: dict[str, tuple[torch.dtype, tuple[int, ...], Iterable[bytes]]],
                    manifest: dict[str, Any]) -> str:
    """:func:`_checksum` over tensors given as (dtype, shape, their bytes in pieces): a file's tensors are
    hashed as they are read, never whole in memory."""
    h = hashlib.sha256()
    for name in sorted(parts):
        dtype, shape, pieces = parts[name]
        h.update(f"{name}|{dtype}|{tuple(shape)}|".encode())
        for piece in pieces:
            h.update(piece)
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    h.update(json.dumps(body, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> Iterator[bytes]:
    t = t.detach().cpu().contiguous()
    if t.numel():
        yield t.view(torch.uint8).numpy().tobytes()


def _file_bytes(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start .. end`` of an open file, in pieces of at most ``READ_CHUNK``."""
    while start < end:
        piece = os.pread(fd, min(READ_CHUNK, end - start), start)
        if not piece:
            raise CacheEntryError("the file ends before its last tensor")
        start += len(piece)
        yield piece


class CacheEntryError(ValueError):
    """A cache file that is not what its key promises (damaged, edited, foreign)."""


class InversionCache:
    """Directory of ``<key>.safetensors`` inversion results."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> InversionResult | None:
        """The cached result, or None when absent or damaged (a damaged entry is deleted).

        The whole file is verified (streamed through the checksum); the trajectory then stays in the file,
        which is kept open: what was verified is what the slab reads return."""
        path = self.path(key)
        try:
            fh = open_regular(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("inversion cache entry %s cannot be read (%s): recomputing it", path.name, e)
            return None
        try:
            return _open_entry(fh, key)
        except Exception as e:  # any damage means: recompute
            fh.close()
            log.warning("inversion cache entry %s is damaged (%s): recomputing it", path.name, e)
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
            return None

    def writer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> "EntryWriter | None":
        """A new entry for ``key`` whose trajectory (T, N, C, h, w) an inverter fills (see :class:`EntryWriter`);
        None, with a warning, when the folder cannot be written (the run goes on without the cache)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return EntryWriter(self.path(key), shape, dtype)
        except OSError as e:
            _warn_unwritable(self.directory, e)
            return None

    def save(self, key: str, result: InversionResult, **info: Any) -> Path | None:
        """Write atomically (see :mod:`tokenflow.atomic`); on a folder that cannot be written
        (read-only, full, gone) warn and return None: the run goes on without caching.
        (A result whose trajectory is in a file is read whole here; :meth:`writer` streams instead.)"""
        tensors = {"latents": result.latents, **_small_tensors(result)}
        strides = _strides(tensors)
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        manifest = _manifest(key, result, strides, info)
        manifest["checksum"] = _checksum(tensors, manifest)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path(key)) as tmp:
                save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest)})
        except OSError as e:
            _warn_unwritable(self.directory, e)
            return None
        return self.path(key)

    def remove(self, key: str) -> None:
        """Delete the entry of ``key`` (nothing if absent or undeletable: a later write replaces it anyway)."""
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError:
            pass

    def remove_stale(self) -> list[Path]:
        """Delete temporary files left by killed processes (see :func:`tokenflow.atomic.remove_stale`)."""
        return remove_stale(self.directory)

    def lock_path(self, key: str) -> Path:
        return self.directory / "locks" / f"{key}.lock"

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold an exclusive advisory lock on ``key`` (``fcntl.flock`` on ``locks/<key>.lock``) for the block.

        Waits while another process holds it (logged once at INFO after ``LOCK_PATIENCE`` s); ``timeout``: raise
        TimeoutError after that many seconds instead of waiting on (None: wait as long as it takes). The kernel
        releases the lock when its holder exits or is killed, so a crashed run never blocks the next. Lock files
        stay in place (empty, or the holder's pid as text for humans; never read): deleting one that another
        process has open would let two processes hold "the" lock at once. Without ``fcntl`` (Windows), or when
        the lock file cannot be opened (read-only folder), the block runs unlocked. Not re-entrant: a nested
        ``lock(key)`` in the same process waits for itself."""
        path = self.lock_path(key)
        if fcntl is None:
            log.debug("no fcntl on this platform: not locking %s", path)
            yield
            return
        fd = _open_lock(path)
        if fd is None:
            yield
            return
        try:
            _acquire(fd, key, path, timeout)
            with contextlib.suppress(OSError):  # who holds it, for a human looking at the folder
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _open_lock(path: Path) -> int | None:
    """An open descriptor of the regular lock file ``path`` (created as needed), or None, logged, when it cannot be
    opened (the caller then runs unlocked: the cache is an optimisation)."""
    flags = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        except PermissionError:  # another user's lock file: flock works on a read-only descriptor too
            fd = os.open(path, os.O_RDONLY | flags)
    except OSError as e:
        log.info("cannot open the inversion cache lock %s (%s): not locking — concurrent runs on this video may "
                 "each invert it", path, e.strerror or e)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        log.warning("%s is not a regular file: not locking — delete it so concurrent runs invert this video once", path)
        return None
    return fd


def _acquire(fd: int, key: str, path: Path, timeout: float | None) -> None:
    """``flock(fd, LOCK_EX)``, logging once when the wait lasts more than ``LOCK_PATIENCE`` s; TimeoutError after
    ``timeout`` s."""
    assert fcntl is not None
    start, told = time.monotonic(), False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"another process still holds the inversion cache lock {path} after {timeout:g} s "
                               f"(key {key}); wait for it to finish or stop it")
        if not told and waited >= LOCK_PATIENCE:
            log.info("waiting for another process inverting the same video (inversion cache key %s, lock %s)",
                     key, path)
            told = True
        if told and timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # nothing more to report: sleep in the kernel until it is released
            return
        time.sleep(LOCK_POLL if timeout is None else min(LOCK_POLL, max(0.0, timeout - waited)))


class EntryWriter:
    """A cache entry being written under a temporary name beside its final one.

    ``trajectory``: a :class:`FileTrajectory` at a fixed offset of the file (after ``HEADER_ROOM`` bytes
    kept for the header) for the inverter to fill slab by slab. :meth:`publish` appends the other
    tensors, writes the header (manifest and checksum, computed by reading the file back), flushes and
    renames the file to the entry's name; until then a kill leaves only a temporary that
    :func:`~tokenflow.atomic.remove_stale` deletes, and :meth:`discard` removes it at once.
    Both close the file: a run reads its trajectory from a store of its own (see ``invert_video``), so
    nothing that later happens to the published entry changes a running edit.
    """

    def __init__(self, dest: Path, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        self.dest, self.tmp = dest, temp_path(dest)
        self.file = open(self.tmp, "w+b")
        self.failed: OSError | None = None
        self.file_trajectory = FileTrajectory(self.file, 8 + HEADER_ROOM, shape, dtype)
        self.trajectory: Trajectory = _DroppingTrajectory(self)
        try:
            self.file.truncate(8 + HEADER_ROOM + self.file_trajectory.nbytes)
        except OSError:
            self.discard()
            raise

    def drop(self, error: OSError) -> None:
        """A write into the entry failed (the cache's disk is full): warn once, remove the temporary, write no more."""
        if self.failed is None:
            self.failed = error
            _warn_unwritable(self.dest.parent, error)
            self.discard()

    def publish(self, key: str, result: InversionResult, **info: Any) -> Path | None:
        """Complete the entry for ``result`` (whose latents were written into this writer's ``trajectory``) and
        rename it to its final name; on a write failure (full disk) warn, drop the entry and return None."""
        if self.failed is not None:
            return None
        small = {name: t.detach().cpu() for name, t in _small_tensors(result).items()}
        strides = _strides(small)
        small = {name: t.contiguous() for name, t in small.items()}
        fd, base = self.file.fileno(), 8 + HEADER_ROOM
        traj = self.file_trajectory
        entries = {"latents": {"dtype": CODES[traj.dtype], "shape": list(traj.shape), "data_offsets": [0, traj.nbytes]}}
        end = traj.nbytes
        try:
            for name in sorted(small):
                t = small[name]
                data = b"".join(_tensor_bytes(t))
                entries[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [end, end + len(data)]}
                _pwrite_all(fd, data, base + end)
                end += len(data)
            manifest = _manifest(key, result, strides, info)
            parts = {name: (t.dtype, tuple(t.shape), _tensor_bytes(t)) for name, t in small.items()}
            if result.null_text is not None:  # last (its name sorts after the others'), copied one step at a time
                table, begin = result.null_text, end
                for i in range(table.shape[0]):
                    data = b"".join(_tensor_bytes(table.step(i).float().contiguous()))
                    _pwrite_all(fd, data, base + end)
                    end += len(data)
                entries[NULL_TABLE] = {"dtype": CODES[torch.float32], "shape": list(table.shape),
                                       "data_offsets": [begin, end]}
                parts[NULL_TABLE] = (torch.float32, table.shape, _file_bytes(fd, base + begin, base + end))
            self.file.truncate(base + end)
            parts["latents"] = (traj.dtype, traj.shape, _file_bytes(fd, base, base + traj.nbytes))
            manifest["checksum"] = _checksum_parts(parts, manifest)
            header = json.dumps({**entries, "__metadata__": {"manifest": json.dumps(manifest)}}).encode()
            if len(header) > HEADER_ROOM:
                raise OSError(f"the manifest takes {len(header)} bytes, more than the {HEADER_ROOM} kept for it")
            _pwrite_all(fd, struct.pack("<Q", HEADER_ROOM) + header + b" " * (HEADER_ROOM - len(header)), 0)
            self.file.flush()
            os.fsync(fd)
            os.replace(self.tmp, self.dest)
        except OSError as e:
            _warn_unwritable(self.dest.parent, e)
            self.discard()
            return None
        self.file.close()
        return self.dest

    def discard(self) -> None:
        """Close and remove the temporary file."""
        self.file.close()
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


class _DroppingTrajectory(Trajectory):
    """The entry's trajectory as the inverter sees it: a write that fails drops the entry (:meth:`EntryWriter.drop`)
    instead of failing the inversion — the cache is an optimisation, the run goes on without it."""

    def __init__(self, writer: EntryWriter) -> None:
        self.writer, self.shape, self.dtype = writer, writer.file_trajectory.shape, writer.file_trajectory.dtype

    def read(self, i: int, frames: Any = None) -> torch.Tensor:
        return self.writer.file_trajectory.read(i, frames)

    def write(self, i: int, start: int, rows: torch.Tensor) -> None:
        if self.writer.failed is not None:
            return
        try:
            self.writer.file_trajectory.write(i, start, rows)
        except OSError as e:
            self.writer.drop(e)


def _open_entry(fh: BinaryIO, key: str) -> InversionResult:
    """Parse and verify an open cache file; raises CacheEntryError (or a parse error) when anything is off.

    Everything but the trajectory is loaded; the trajectory is read from ``fh`` one slab at a time."""
    fd = fh.fileno()
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CacheEntryError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise CacheEntryError("header longer than the file")
    header = json.loads(os.pread(fd, n, 8))
    manifest = json.loads(header.get("__metadata__", {})["manifest"])
    if manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
        raise CacheEntryError("written for another key or format")
    base, layout = 8 + n, {name: v for name, v in header.items() if name != "__metadata__"}
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], name) for name, v in layout.items())
    at = 0
    for begin, end, name in spans:  # the tensors tile the data section exactly, each its own size
        info = layout[name]
        if begin != at or end - begin != math.prod(info["shape"]) * DTYPES[info["dtype"]].itemsize:
            raise CacheEntryError(f"tensor {name!r} is not where or what its header says")
        at = end
    if base + at != size:
        raise CacheEntryError(f"the file has {size} bytes, its header describes {base + at}")
    parts = {name: (DTYPES[v["dtype"]], tuple(v["shape"]), _file_bytes(fd, base + v["data_offsets"][0],
                                                                       base + v["data_offsets"][1]))
             for name, v in layout.items()}
    if manifest.get("checksum") != _checksum_parts(parts, manifest):
        raise CacheEntryError("checksum mismatch")
    if "latents" not in layout or "clean" not in layout:
        raise CacheEntryError("no latents or clean tensor")
    strides = manifest["strides"]
    tensors = {name: _restride(_read_tensor(fd, base, v), strides.get(name)) for name, v in layout.items()
               if name not in ("latents", NULL_TABLE)}
    shape, timesteps, clean = tuple(layout["latents"]["shape"]), manifest["timesteps"], tensors["clean"]
    if len(shape) != 5 or shape[0] != len(timesteps) or shape[1:] != tuple(clean.shape):
        raise CacheEntryError(f"latents {shape} do not match {len(timesteps)} timesteps and clean {tuple(clean.shape)}")
    channels_last = _channels_last(shape, strides.get("latents"))
    trajectory = FileTrajectory(fh, base + layout["latents"]["data_offsets"][0], shape,
                                DTYPES[layout["latents"]["dtype"]], channels_last=channels_last)
    extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    null_text = None
    if NULL_TABLE in layout:  # read from the file one step at a time, like the trajectory
        info = layout[NULL_TABLE]
        t_, n_, length, d = info["shape"]
        if NULL_TABLE in strides or (t_, n_) != shape[:2]:
            raise CacheEntryError(f"null-text table {info['shape']} does not match the latents {shape}")
        store = FileTrajectory(fh, base + info["data_offsets"][0], (t_, n_, 1, length, d), DTYPES[info["dtype"]])
        null_text = NullTextEmbeddings(store, float(manifest["null_text_guidance_scale"]), tensors.get("null_text.pooled"))
    return InversionResult([int(t) for t in timesteps], trajectory, clean, manifest["prompt"], manifest["settings"],
                           null_text, extras)


def _read_tensor(fd: int, base: int, info: dict[str, Any]) -> torch.Tensor:
    begin, end = info["data_offsets"]
    data = bytearray(b"".join(_file_bytes(fd, base + begin, base + end)))
    dtype = DTYPES[info["dtype"]]
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(info["shape"]) if data else torch.empty(info["shape"], dtype=dtype)


def _channels_last(shape: tuple[int, ...], stride: list[int] | None) -> bool:
    """Whether a saved (T, N, C, h, w) stride record lays each slab out channels-last."""
    if stride is None:
        return False
    if len(stride) != 5:
        raise CacheEntryError("stride record does not match the tensor")
    probe = torch.empty_strided(shape, stride)
    if not _dense(probe):
        raise CacheEntryError("stride record is not a dense layout")
    return probe[0].is_contiguous(memory_format=torch.channels_last) and not probe[0].is_contiguous()


def _small_tensors(result: InversionResult) -> dict[str, torch.Tensor]:
    """Everything an entry holds besides the trajectory and the null-text table: clean latents, extras, the pooled
    null embedding."""
    tensors = {"clean": result.clean, **{f"extra.{k}": v for k, v in result.extras.items()}}
    if result.null_text is not None:  # its table is streamed by the writer (never whole in RAM)
        if result.null_text.pooled is not None:
            tensors["null_text.pooled"] = result.null_text.pooled
    return tensors


def _strides(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {name: list(t.stride()) for name, t in tensors.items() if _dense(t) and not t.is_contiguous()}


def _manifest(key: str, result: InversionResult, strides: dict[str, list[int]], info: dict[str, Any]) -> dict[str, Any]:
    extra_meta: dict[str, Any] = {}
    if result.null_text is not None:
        extra_meta["null_text_guidance_scale"] = result.null_text.guidance_scale
    manifest: dict[str, Any] = {"format": CACHE_FORMAT, "key": key, "timesteps": [int(t) for t in result.timesteps],
                                "prompt": result.prompt, "settings": result.settings, "strides": strides,
                                **extra_meta, **info}
    return json.loads(json.dumps(manifest, default=str))  # what a load will read back


def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _warn_unwritable(folder: Path, e: OSError) -> None:
    log.warning("cannot write the inversion cache in %s (%s) — going on without caching this inversion; "
                "free space there or set cache_dir= to a writable folder", folder, e.strerror or e)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides are a permutation of a contiguous layout (no gaps, no overlaps)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _restride(t: torch.Tensor, stride: list[int] | None) -> torch.Tensor:
    """``t`` laid out with the saved ``stride`` (e.g. channels-last latents), so a loaded inversion runs
    through the same kernels as the freshly computed one; contiguous when none was saved."""
    if stride is None:
        return t
    if len(stride) != t.ndim:
        raise CacheEntryError("stride record does not match the tensor")
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype)
    if not _dense(out):
        raise CacheEntryError("stride record is not a dense layout")
    return out.copy_(t)
