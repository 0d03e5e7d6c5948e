"""One line per user error, whoever raised it: tokenflow, Hydra (composition, overrides) or OmegaConf.

:func:`user_error` turns an exception into ``"<the value> ... — <the fix>"`` or returns None for an
exception that is a bug (those keep their traceback).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from tokenflow.errors import TokenFlowError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)
_NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST, errno.EISDIR)
_USER_OS_ERRORS = _FULL + _DENIED + _NOT_A_FOLDER


def user_error(error: BaseException, args: list[str] | None = None,
               places: Mapping[str, str] | None = None) -> str | None:
    """The one-line message for a user error, or None for a bug. ``args``: the command-line overrides;
    ``places``: folder -> what it is (``"the run folder"``), named when a write under it fails."""
    args = args or []
    inner = _wrapped_user_error(error)
    if inner is not None:  # ours (or the disk's) wrapped by Hydra's instantiate or an OmegaConf resolver
        return user_error(inner, args, places)
    if isinstance(error, MissingMandatoryValue):
        key = getattr(error, "full_key", None) or "?"
        return f"{key} is not set — give it on the command line, e.g. {key}=..." + (
            " (video=sample runs on the embedded clip)" if key == "video" else "")
    if isinstance(error, TokenFlowError):
        return _flat(str(error))
    if isinstance(error, MissingConfigException):
        return _missing_option(error)
    if isinstance(error, OverrideParseException):
        return _bad_syntax(error, args)
    if isinstance(error, HydraException):
        return _composition(error, args)
    if isinstance(error, OmegaConfBaseException):
        key = getattr(error, "full_key", None)
        return f"{key}: {_first(error)} — fix that setting" if key else f"{_first(error)} — fix the configuration"
    if isinstance(error, OSError) and error.errno in _USER_OS_ERRORS:
        return disk_error(error, places)
    if _out_of_memory(error):
        return (f"the run ran out of memory ({_first(error)[:120]}) — lower height/width, n_frames or chunk_size, use "
                "experiment=long_video, or raise the memory limit (ulimit -v)")
    return None


def _out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def disk_error(error: OSError, places: Mapping[str, str] | None = None) -> str:
    """One line for a failed write: which file, in which of ``places`` (the run folder, the cache, $TMPDIR), why,
    and the fix that fits the errno."""
    path = str(error.filename) if error.filename else None
    role = _place(path, places or {}) if path else None
    where = f"'{path}'" + (f" in {role}" if role else "") if path else "a file"
    if error.errno in _FULL:
        return f"cannot write {where}: {error.strerror} — free space on that disk or choose a folder on another one"
    if error.errno in _DENIED:
        return f"cannot write {where}: {error.strerror} — choose a folder you can write"
    return f"cannot create {where}: {error.strerror} (a file stands where a folder is needed) — remove it or choose " \
           "another folder"


def hydra_save_failure(error: BaseException) -> tuple[BaseException, dict[str, str]]:
    """An OSError raised while Hydra saved the run folder's ``.hydra/`` files (which names no file) as one naming the
    file, with that run folder as a place (``{folder: "the run folder"}``); any other error as it is, no places."""
    if not isinstance(error, OSError) or error.filename:
        return error, {}
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame if tb is not None else None
    if frame is None or frame.f_code.co_name != "_save_config" or "output_dir" not in frame.f_locals:
        return error, {}
    folder = Path(frame.f_locals["output_dir"])
    named = OSError(error.errno, error.strerror, str(folder / str(frame.f_locals.get("filename", ""))))
    return named, {str(folder.parent): "the run folder"}


def _place(path: str, places: Mapping[str, str]) -> str | None:
    """The role of the deepest folder of ``places`` that holds ``path``, with that folder."""
    target = os.path.abspath(path)
    best = None
    for folder, role in places.items():
        root = os.path.abspath(folder)
        if (target == root or target.startswith(root.rstrip(os.sep) + os.sep)) and (best is None or len(root) > len(best[0])):
            best = (root, role)
    return f"{best[1]} {best[0]}" if best else None


def _wrapped_user_error(error: BaseException) -> BaseException | None:
    """The TokenFlowError (else user-facing OSError or failed allocation) that ``error`` wraps (its causes), if it
    is not one itself."""
    if isinstance(error, TokenFlowError) or _plain_user_error(error):
        return None
    found, cause, seen = None, _wrapped(error), set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, TokenFlowError):
            return cause
        if found is None and _plain_user_error(cause):
            found = cause
        cause = _wrapped(cause)
    return found


def _plain_user_error(error: BaseException) -> bool:
    """A disk error the user can act on, or a failed allocation."""
    return (isinstance(error, OSError) and error.errno in _USER_OS_ERRORS) or _out_of_memory(error)


def _wrapped(error: BaseException) -> BaseException | None:
    """What ``error`` was raised from: its ``__cause__``; for Hydra's and OmegaConf's wrappers also the error being
    handled when they were raised (never that of any other exception: a bug in an ``except`` block stays a bug)."""
    if error.__cause__ is not None:
        return error.__cause__
    return error.__context__ if isinstance(error, (HydraException, OmegaConfBaseException)) else None


def _missing_option(error: MissingConfigException) -> str:
    missing = str(getattr(error, "missing_cfg_file", "") or "")
    options = [o for o in (getattr(error, "options", None) or []) if "." not in o]
    if "/" in missing and options:
        from tokenflow.cli.plugins import GROUPS

        group, value = missing.rsplit("/", 1)
        custom = f", or a class of yours as a dotted path ({group}=my_module.MyClass)" if group in GROUPS else ""
        return f"{group}={value} is not an option of {group} — use one of {', '.join(options)}{custom}"
    return f"{_first(error)} — check the name"


def _bad_syntax(error: OverrideParseException, args: list[str]) -> str:
    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_override(arg)
        except Exception:
            return (f"cannot parse the override {arg!r} ({_first(error)}) — quote values with spaces or brackets, "
                    f"e.g. 'prompt=\"a (red) fox\"', and escape = , [ ] {{ }} in them with a backslash")
    return f"{_first(error)} — check the command line's syntax"


def _composition(error: HydraException, args: list[str]) -> str:
    text = str(error)
    cause = error.__cause__
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        given = next((a for a in reversed(args) if a.lstrip("+~").split("=", 1)[0] == key), f"{key}=...")
        if "." not in key:
            return (f"{given}: tokenflow has no setting {key!r} — check the spelling "
                    f"(settings: {', '.join(run_settings())})")
        group = key.split(".", 1)[0]
        return (f"{given}: the {group} has no setting {key.split('.', 1)[1]!r} — check the spelling, or add it "
                f"with +{given.lstrip('+')} if your class takes it")
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        given = next((a for a in reversed(args) if key and a.lstrip("+").split("=", 1)[0] == key), key)
        return f"{given}: {_first(cause)} — fix the value"
    if isinstance(error, CompactHydraException) or text:
        return f"{_first(error)} — check the command line"
    return type(error).__name__


def run_settings() -> list[str]:
    """The top-level settings of the run schema."""
    from tokenflow.cli.config import RunConfig

    return sorted(f.name for f in dataclasses.fields(RunConfig))


def _first(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _flat(text: str) -> str:
    return " ".join(text.split())
