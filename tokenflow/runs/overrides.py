"""A job's Hydra overrides (``.hydra/overrides.yaml``) as {key: value}, and back to override strings."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any


def parse_overrides(lines: Sequence[str]) -> dict[str, Any]:
    """Hydra override strings (``editor.strength=0.8``, ``prompt='a fox'``) → {key: JSON-compatible value}."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, Any] = {}
    parser = OverridesParser.create()
    for line in lines:
        try:
            ov = parser.parse_overrides([line])[0]
            key = ov.key_or_group if ov.package is None else f"{ov.key_or_group}@{ov.package}"
            out[key] = None if ov.is_delete() else ov.value()
        except Exception:  # not Hydra syntax: keep it as text
            key, _, value = line.lstrip("+~").partition("=")
            out[key] = value
    return json.loads(json.dumps(out, default=str))


def override_line(key: str, value: Any) -> str:
    """One Hydra override string for ``key`` = ``value`` (strings quoted when needed)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif value is None:
        text = "null"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(override_line("k", v)[2:] for v in value) + "]"
    else:
        s = str(value)
        text = s if re.fullmatch(r"[\w./:-]+", s) else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={text}"
