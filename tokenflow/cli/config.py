"""Structured run configuration (validated types and ranges) and typed instantiation of config groups.

The top-level keys are a dataclass registered in Hydra's ConfigStore; each pluggable part (model,
inverter, editor, propagator, search, keyframes) is a YAML group with ``_target_``. Parts whose
class carries a config dataclass are validated against it before construction, so a wrong key or
type fails at start-up with the key's name.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokenflow.errors import ConfigError, TokenFlowError


DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"


def negative_prompt(cfg: Any, inverter: Any) -> str:
    """The run's negative prompt: as given, else empty for a null-text inversion (its embeddings are the
    unconditional branch) and :data:`DEFAULT_NEGATIVE_PROMPT` otherwise."""
    if cfg.negative_prompt is not None:
        return str(cfg.negative_prompt)
    return "" if inverter.provides_null_text else DEFAULT_NEGATIVE_PROMPT


@dataclass
class RunConfig:
    """Top-level keys shared by ``tokenflow-invert`` and ``tokenflow-edit``."""

    task: str = "edit"                  # edit | invert (names the output folder)
    video: str = "sample"               # input video file, folder of frames, or "sample" (the embedded clip)
    prompt: str = ""                    # target prompt (edit)
    negative_prompt: Optional[str] = None  # None: DEFAULT_NEGATIVE_PROMPT, or "" with a null-text inversion
    inversion_prompt: str = ""          # describes the input video; conditions inversion and the source branch
    n_frames: Optional[int] = None      # first n frames (after frame_stride); None = all
    frame_stride: int = 1               # take every k-th frame of the video
    round_frames_down: bool = False     # drop frames to a multiple of keyframe_stride (the official code does)
    height: Optional[int] = None        # output size, multiples of 64; None = short side 512, aspect kept
    width: Optional[int] = None
    n_steps: int = 50                   # DDIM sampling steps of the edit (and kept inversion timesteps)
    keyframe_stride: int = 8            # one keyframe per this many frames
    chunk_size: int = 8                 # frames per UNet call
    seed: int = 1
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                 # auto | float32 | float16 | bfloat16
    cache_dir: Optional[str] = None     # inversion and tiny-model cache; None = user cache dir
    use_cache: bool = True
    progress: bool = True
    verbose: bool = False               # full tracebacks on errors
    model: Any = None
    inverter: Any = None
    editor: Any = None
    propagator: Any = None
    search: Any = None
    keyframes: Any = None
    metrics: Any = None                 # the scores of the output (conf/metrics: default, full, tiny, none)
    attention: Any = None               # what keyframes attend to (conf/attention: full, anchors)
    experiment: Any = None


def validate_run(cfg: Any) -> None:
    """Range checks with actionable messages (types are checked by OmegaConf)."""
    def positive(name: str) -> None:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be >= 1 — use a positive number")

    for name in ("n_frames", "frame_stride", "n_steps", "keyframe_stride", "chunk_size"):
        positive(name)
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value is not None and (value < 64 or value % 64):
            raise ConfigError(f"{name}={value} is not a multiple of 64 — use e.g. {max(64, round(value / 64) * 64)}")


ConfigStore.instance().store(name="run_schema", node=RunConfig)


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
        plain = {k: v for k, v in node.items() if k != "_target_" and k in known}
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
        cause = e
        while cause is not None and not isinstance(cause, TokenFlowError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        signature = _signature_error(e)
        if signature:  # a class without a Config dataclass given a setting it does not take
            raise ConfigError(f"{target}: {signature} — check its settings (given: "
                              f"{sorted(k for k in node if k != '_target_')})") from e
        raise


def _signature_error(error: BaseException) -> str | None:
    """The TypeError of a call with wrong keyword arguments, if that is what ``error`` wraps."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, TypeError) and ("unexpected keyword argument" in str(cause)
                                             or "required positional argument" in str(cause)
                                             or "required keyword-only argument" in str(cause)
                                             or "takes no arguments" in str(cause)):
            return str(cause).splitlines()[0]
        cause = cause.__cause__ or cause.__context__
    return None


def _target(path: str) -> Any:
    try:
        return get_object(path)
    except Exception:
        return None


def _is_node(value: Any) -> bool:
    return isinstance(value, DictConfig) and "_target_" in value
