"""Metric suites from config: an option of ``conf/metrics`` or a YAML file (:func:`build_suite`), or a run folder's
``metrics`` node rebuilt as data by name (:func:`suite_from_data`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tokenflow.errors import ConfigError
from tokenflow.evaluation.interface import MetricSuite, VideoMetric
from tokenflow.evaluation.model_metrics import ClipMetric, DinoStructureMetric
from tokenflow.evaluation.weight_free import BackgroundMetric, TrackMetric, WarpErrorMetric
from tokenflow.instantiation import build

DEFAULT_SUITE = "default"


#: The library's metrics by family name (the keys of ``conf/metrics/*.yaml``). A received run folder's
#: ``metrics`` node is rebuilt from these by name (:func:`suite_from_data`), never by instantiating its ``_target_``s.
METRIC_CLASSES: dict[str, type[VideoMetric]] = {cls.name: cls for cls in (
    WarpErrorMetric, TrackMetric, BackgroundMetric, ClipMetric, DinoStructureMetric)}
_LEGACY_MODULE = "tokenflow.evaluation.scores"  # the metrics' module before the split: older run folders name it


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_SUITE_TARGET = _dotted(MetricSuite)
_CONTEXT_KEYS = ("device", "cache_dir")  # the only interpolations a shipped metrics config holds


def suite_from_data(node: Mapping[str, Any], context: Mapping[str, Any] | None = None,
                    where: str = "metrics") -> MetricSuite:
    """A :class:`MetricSuite` from a metrics node read from a file that is data (a run folder's config.yaml).

    Each entry must name one of :data:`METRIC_CLASSES` by its ``_target_`` (the dotted path the library writes, or
    wrote before the metrics left ``tokenflow.evaluation.scores``) and hold plain settings (numbers, strings,
    booleans, lists of them); the class is looked up in the registry and built with those settings, checked against its ``Config``. ``${device}`` and
    ``${cache_dir}`` are filled from ``context``; any other interpolation, an unknown ``_target_`` or a
    nested node is refused in one line naming the key, before anything is built.
    """
    context = {"device": "auto", "cache_dir": None, **(context or {})}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where} is {type(node).__name__}, not a mapping of metrics — rescore with --metrics "
                          "<name or file>")
    current = sorted(_dotted(c) for c in METRIC_CLASSES.values())
    known = {path: c for c in METRIC_CLASSES.values() for path in (_dotted(c), f"{_LEGACY_MODULE}.{c.__qualname__}")}
    metrics: dict[str, VideoMetric] = {}
    plans = []
    for name, sub in node.items():
        if name == "_target_":
            if sub not in (_SUITE_TARGET, f"{_LEGACY_MODULE}.{MetricSuite.__qualname__}"):
                raise ConfigError(f"{where}._target_={sub!r} is not {_SUITE_TARGET} — a metrics node from a run folder "
                                  "is data: rescore with --metrics <name or file> to choose the metrics")
            continue
        target = sub.get("_target_") if isinstance(sub, Mapping) else None
        if target not in known:
            raise ConfigError(f"{where}.{name} names {target!r}, not one of the library's metrics "
                              f"({', '.join(current)}) — rescore with --metrics <name or file>")
        settings = {k: _plain_setting(v, f"{where}.{name}.{k}", context) for k, v in sub.items() if k != "_target_"}
        plans.append((name, known[target], settings))
    for name, cls, settings in plans:
        _check_metric_settings(f"{where}.{name}", cls, settings)
        metrics[name] = cls(**settings)
    return MetricSuite(**metrics)


def _check_metric_settings(key: str, cls: type, settings: Mapping[str, Any]) -> None:
    """Refuse, in one line, a setting that ``cls``'s ``Config`` dataclass does not declare (none: no check)."""
    schema = getattr(cls, "Config", None)
    if schema is not None and is_dataclass(schema):
        known = sorted(f.name for f in fields(schema))
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ConfigError(f"{key} has no setting {unknown[0]!r} — valid settings: {known}")


def _plain_setting(value: Any, key: str, context: Mapping[str, Any]) -> Any:
    """``value`` if it is plain data (``${device}``/``${cache_dir}`` filled from ``context``); else ConfigError."""
    if isinstance(value, list):
        return [_plain_setting(v, f"{key}[{i}]", context) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        name = value[2:-1] if value.startswith("${") and value.endswith("}") else None
        if name in _CONTEXT_KEYS:
            return context.get(name)
        raise ConfigError(f"{key}={value!r} is an interpolation — a run folder's config is data; rescore with "
                          "--metrics <name or file> or set the value with KEY=VALUE")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{key} is a {type(value).__name__}, not a plain setting — a run folder's config is data; "
                      "rescore with --metrics <name or file>")



def suite_node(spec: str | Mapping | Any) -> Any:
    """The config node of a suite: an option of ``conf/metrics`` (``default``, ``full``, ``tiny``, ``none``), a
    YAML file, or a node (dict / DictConfig) as given."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, (Mapping, DictConfig)):
        return OmegaConf.create(spec) if not isinstance(spec, DictConfig) else spec
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        packaged = resources.files("tokenflow.conf") / "metrics" / f"{spec}.yaml"
        if not packaged.is_file():
            options = sorted(p.name[:-5] for p in (resources.files("tokenflow.conf") / "metrics").iterdir()
                             if p.name.endswith(".yaml"))
            raise ConfigError(f"metrics={spec!r} is neither a YAML file nor one of {', '.join(options)} — pick one")
        return OmegaConf.create(packaged.read_text())
    return OmegaConf.load(path)


def build_suite(spec: str | Mapping | Any = DEFAULT_SUITE, overrides: Sequence[str] = (),
                context: Mapping[str, Any] | None = None) -> MetricSuite:
    """A :class:`MetricSuite` from :func:`suite_node` ``spec`` plus Hydra-style ``overrides`` (``clip.model=/x``,
    ``+warp.x=1``, ``~tracks``).

    Interpolations such as ``${device}`` resolve against ``context`` (default: device=auto, cache_dir=None),
    as they resolve against the run config under Hydra. Each metric's keys are checked against its Config.
    """
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    node = _apply_overrides(suite_node(spec), overrides)
    root = OmegaConf.create({"device": "auto", "cache_dir": None, **(context or {})})
    root.metrics = node
    resolved = OmegaConf.to_container(root.metrics, resolve=True)
    for name, sub in resolved.items():
        if name == "_target_":
            continue
        if isinstance(sub, dict) and "_target_" in sub:
            _check_metric_settings(f"metrics.{name}", get_class(sub["_target_"]),
                                   {k: v for k, v in sub.items() if k != "_target_"})
    suite = build(resolved)
    if not isinstance(suite, MetricSuite):
        raise ConfigError(f"metrics config builds a {type(suite).__name__} — its _target_ must be {_SUITE_TARGET}")
    return suite


def _apply_overrides(node: Any, overrides: Sequence[str]) -> Any:
    """``node`` (a DictConfig) with Hydra-style ``overrides`` applied: ``key=value``, ``+key=value``, ``~key``."""
    from omegaconf import OmegaConf

    for item in overrides:
        if item.startswith("~"):
            parent, _, leaf = item[1:].partition("=")[0].rpartition(".")
            target = OmegaConf.select(node, parent) if parent else node
            if target is None or leaf not in target:
                raise ConfigError(f"cannot remove {item[1:]!r}: the metrics config has no such key")
            target.pop(leaf)
        else:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist([item.lstrip("+")]))
    return node


def with_overrides(node: Any, overrides: Sequence[str]) -> Any:
    """A plain metrics node with ``overrides`` applied (:func:`_apply_overrides`), unresolved."""
    from omegaconf import OmegaConf

    if not overrides:
        return node
    return OmegaConf.to_container(_apply_overrides(OmegaConf.create(node), overrides), resolve=False)
