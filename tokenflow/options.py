"""Settings of config dataclasses: named choices as ``str`` enums (OmegaConf checks them on the command line,
:func:`choice` in Python), range checks, and :func:`configured` (a settings class's fields as its constructor's
signature)."""
from __future__ import annotations

import dataclasses
import inspect
import math
from enum import Enum
from typing import TypeVar

from tokenflow.errors import ConfigError

E = TypeVar("E", bound=Enum)
C = TypeVar("C", bound=type)


def configured(cls: C) -> C:
    """Class decorator for ``__init__(self, ..., **config)`` classes with a ``Config`` dataclass: the constructor's
    signature (``help()``, ``inspect.signature``, notebook completion) lists the dataclass's fields as keyword
    parameters with their defaults and types; the dataclass stays the one place the settings are written."""
    own = inspect.signature(cls.__init__).parameters.values()  # self and named parameters (e.g. a search) first
    params = [p for p in own if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    for f in dataclasses.fields(cls.Config):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else inspect.Parameter.empty)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type))
    cls.__init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return cls


def choice(kind: type[E], value: object, name: str) -> E:
    """``value`` as a member of ``kind``; a ConfigError naming the setting and the valid values otherwise."""
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"{name}={value!r} is unknown — use one of {valid}") from None


def fraction(value: object, name: str, what: str = "a fraction of the denoising steps") -> float:
    """``value`` as a float in [0, 1] (``what`` says of what); a ConfigError naming the setting otherwise."""
    v = float(value)  # type: ignore[arg-type]
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise ConfigError(f"{name}={value} must be in [0, 1] — it is {what}")
    return v


def non_negative(value: object, name: str, usual: str = "7.5 is the usual value") -> float:
    """``value`` as a finite float >= 0 (a guidance or conditioning scale); a ConfigError naming the setting and
    ``usual`` otherwise."""
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ConfigError(f"{name}={v} is not a finite number — give a real value ({usual})")
    if v < 0:
        raise ConfigError(f"{name}={value} must be >= 0 — {usual}")
    return v
