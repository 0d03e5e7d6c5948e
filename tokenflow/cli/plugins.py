"""Your own classes from the command line: ``editor=my_module.MyEditor`` (a dotted path as a group option).

For the pluggable groups (editor, propagator, inverter, keyframes, search) a value that is not one of
the group's YAML options but a dotted Python path is imported and registered as an option of that
group whose node is ``_target_`` plus the class's own settings with their defaults (from its
``Config`` dataclass, else its constructor's keyword arguments): nothing is inherited from the default
option, ``editor.foo=1`` sets a declared setting and ``+editor.foo=1`` adds one. The current folder is
importable, as with ``python -m``.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.resources
import inspect
import os
import re
import sys
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser

from tokenflow.errors import ConfigError

#: group -> (module, class) of the interface an option of the group implements (None: any callable)
GROUPS: dict[str, tuple[str, str] | None] = {
    "editor": ("tokenflow.core.editor", "KeyframeEditor"),
    "propagator": ("tokenflow.core.propagation", "Propagator"),
    "inverter": ("tokenflow.core.inversion", "Inverter"),
    "keyframes": ("tokenflow.core.keyframes", "KeyframeSchedule"),
    "search": None,  # factories (make_search) and NeighbourSearch classes alike
}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_PRIMITIVE = (bool, int, float, str, type(None))


def make_cwd_importable() -> None:
    """Put the current folder first on ``sys.path``, as ``python -m`` does (console scripts do not)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def register_class_options(args: list[str]) -> list[str]:
    """Register every dotted-path value given to a pluggable group in ``args``; returns the paths registered.

    Unparsable arguments are left to Hydra, which reports them. Raises ConfigError (one line) when a
    path does not import or names something that is not a part of that group's kind.
    """
    parser = OverridesParser.create()
    registered = []
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # Hydra reports the syntax error with its own message
            continue
        group = override.key_or_group
        if group not in GROUPS or override.package is not None or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if isinstance(value, str) and _DOTTED.match(value) and not _is_yaml_option(group, value):
                ConfigStore.instance().store(group=group, name=value, node=class_node(group, value))
                registered.append(value)
    return registered


def class_node(group: str, path: str) -> dict[str, Any]:
    """``{"_target_": path, setting: default, ...}`` for the class (or factory) at ``path``."""
    target = import_object(group, path)
    _check_kind(group, path, target)
    return {"_target_": path, **settings_of(target)}


def import_object(group: str, path: str) -> Any:
    """The object at dotted ``path`` (module path, then attributes), or a one-line ConfigError."""
    parts = path.split(".")
    error: Exception | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):  # the module itself (or a parent) is missing
                error = e
                continue
            raise ConfigError(f"{group}={path}: importing {module_name} failed: {e} — install what it needs") from e
        except Exception as e:  # a broken module: say where, not a traceback
            raise ConfigError(f"{group}={path}: importing {module_name} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''} — fix {module_name}") from e
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise ConfigError(f"{group}={path}: {module_name} has no {'.'.join(parts[cut:])!r} — check the "
                                  f"class name (defined: {', '.join(n for n in dir(obj) if not n.startswith('_'))[:120]})")
            obj = getattr(obj, attr)
        return obj
    options = ", ".join(yaml_options(group))
    raise ConfigError(f"{group}={path} is neither an option ({options}) nor an importable class ({error}) — "
                      f"put {parts[0]}.py in the current folder or on PYTHONPATH")


def settings_of(target: Any) -> dict[str, Any]:
    """Declared settings with defaults: the ``Config`` dataclass's fields, else constructor keywords.

    Only values a YAML node can hold (numbers, strings, booleans, None, lists and dicts of them; enums as
    their values) are listed; others keep their code default and can still be set with ``+group.key=``.
    """
    schema = getattr(target, "Config", None)
    found: dict[str, Any] = {}
    if schema is not None and dataclasses.is_dataclass(schema):
        for f in dataclasses.fields(schema):
            if f.default is not dataclasses.MISSING:
                found[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                found[f.name] = f.default_factory()  # type: ignore[misc]
    else:
        try:
            params = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
        except (TypeError, ValueError):
            params = {}
        for name, p in params.items():
            if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty:
                found[name] = p.default
    out = {}
    for name, value in found.items():
        value = value.value if isinstance(value, enum.Enum) else value
        if _plain(value):
            out[name] = value
    return out


def yaml_options(group: str) -> list[str]:
    """The group's YAML options shipped in ``tokenflow.conf``."""
    folder = importlib.resources.files("tokenflow.conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def _is_yaml_option(group: str, value: str) -> bool:
    return value in yaml_options(group)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, _PRIMITIVE)


def _check_kind(group: str, path: str, target: Any) -> None:
    kind = GROUPS[group]
    if not callable(target):
        raise ConfigError(f"{group}={path} is a {type(target).__name__}, not a class — name a class")
    if kind is None or not inspect.isclass(target):
        return
    base = getattr(importlib.import_module(kind[0]), kind[1])
    if not issubclass(target, base):
        raise ConfigError(f"{group}={path} is not a {kind[1]} — subclass {kind[0]}.{kind[1]}")
