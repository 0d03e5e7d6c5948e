"""One line per user error, whoever raised it: tokenflow, Hydra (composition, overrides) or OmegaConf.

:func:`user_error` turns an exception into ``"<the value> ... — <the fix>"`` or returns None for an
exception that is a bug (those keep their traceback).
"""
from __future__ import annotations

import dataclasses
import errno
import re

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from tokenflow.errors import TokenFlowError

_USER_OS_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG)


def user_error(error: BaseException, args: list[str] | None = None) -> str | None:
    """The one-line message for a user error, or None for a bug. ``args``: the command-line overrides."""
    args = args or []
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
        where = f" '{error.filename}'" if error.filename else ""
        return f"cannot write{where}: {error.strerror} — free disk space or choose a writable folder"
    return None


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
