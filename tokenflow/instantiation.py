"""Build a ``_target_`` config node: its keys and types checked against the target's ``Config`` first, our own
errors (:class:`~tokenflow.errors.TokenFlowError`) surfaced unwrapped from Hydra's ``InstantiationException``."""
from __future__ import annotations

import enum
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokenflow.errors import ConfigError, chained, library_error


def build(node: DictConfig | dict, **extra: Any) -> Any:
    """Instantiate a ``_target_`` node; if the target has a ``config`` dataclass (``Cls.Config`` or the
    dataclass annotated by its constructor), validate the node's keys and types against it first."""
    node = OmegaConf.create(node) if isinstance(node, dict) else node
    target = node.get("_target_")
    if target is None:
        raise ConfigError(f"config node {OmegaConf.to_yaml(node).strip()!r} has no _target_ — name the class to build")
    schema = getattr(_target(target), "Config", None)
    if schema is not None and is_dataclass(schema):
        known = {f.name for f in fields(schema)}
        # lists of enum members (propagator.stages=[up]) are checked by the class itself (options.choice): OmegaConf
        # 2.3 does not convert strings inside a list typed with an Enum
        plain = {k: v for k, v in node.items() if k != "_target_" and k in known and k not in _enum_lists(schema)}
        unknown = [k for k in node if k != "_target_" and k not in known and k not in extra and not _is_node(node[k])]
        if unknown:
            raise ConfigError(f"{target} has no setting {unknown[0]!r} — valid settings: {sorted(known)}")
        try:
            OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(OmegaConf.to_container(OmegaConf.create(plain), resolve=True)))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
            raise ConfigError(f"{target}.{key}: {str(e).splitlines()[0]} — fix the value's type") from e
    try:
        return instantiate(node, **extra)
    except Exception as e:  # hydra wraps constructor errors; surface ours (TokenFlowError) unwrapped
        ours = library_error(e)
        if ours is not None:
            raise ours from None
        signature = _signature_error(e)
        if signature:  # a class without a Config dataclass given a setting it does not take
            raise ConfigError(f"{target}: {signature} — check its settings (given: "
                              f"{sorted(k for k in node if k != '_target_')})") from e
        raise


def _enum_lists(schema: type) -> set[str]:
    """Fields of the dataclass ``schema`` typed ``list[SomeEnum]`` (or ``Optional`` of it)."""
    try:
        hints = typing.get_type_hints(schema)
    except Exception:
        return set()
    out = set()
    for name, hint in hints.items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        for a in [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]:
            inner = typing.get_args(a)
            if typing.get_origin(a) in (list, tuple) and inner and isinstance(inner[0], type) \
                    and issubclass(inner[0], enum.Enum):
                out.add(name)
    return out


def _signature_error(error: BaseException) -> str | None:
    """The TypeError of a call with wrong keyword arguments, if that is what ``error`` wraps."""
    for cause in chained(error):
        if isinstance(cause, TypeError) and ("unexpected keyword argument" in str(cause)
                                             or "required positional argument" in str(cause)
                                             or "required keyword-only argument" in str(cause)
                                             or "takes no arguments" in str(cause)):
            return str(cause).splitlines()[0]
    return None


def _target(path: str) -> Any:
    try:
        return get_object(path)
    except Exception:
        return None


def _is_node(value: Any) -> bool:
    return isinstance(value, DictConfig) and "_target_" in value
