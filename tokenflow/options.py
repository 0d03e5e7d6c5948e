"""Named choices of config dataclasses as ``str`` enums: OmegaConf checks them on the command line
(``Invalid value 'x', expected one of [...]``) and :func:`choice` checks them in Python."""
from __future__ import annotations

import math
from enum import Enum
from typing import TypeVar

from tokenflow.errors import ConfigError

E = TypeVar("E", bound=Enum)


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
