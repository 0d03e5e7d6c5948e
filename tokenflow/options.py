"""Named choices of config dataclasses as ``str`` enums: OmegaConf checks them on the command line
(``Invalid value 'x', expected one of [...]``) and :func:`choice` checks them in Python."""
from __future__ import annotations

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
