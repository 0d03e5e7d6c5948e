"""Structured run configuration (validated types and ranges), sweep resolvers and the models kept between jobs.

The top-level keys are a dataclass registered in Hydra's ConfigStore; each pluggable part (model,
inverter, editor, propagator, search, keyframes) is a YAML group with ``_target_``, built with
:func:`tokenflow.instantiation.build` (validated against the class's config dataclass before construction,
so a wrong key or type fails at start-up with the key's name).
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from tokenflow.errors import ConfigError
from tokenflow.instantiation import build


log = logging.getLogger("tokenflow")
MULTIPLES_RESOLVER = "tokenflow.multiples"
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
    dataset: Any = None                 # a manifest of videos and prompts (conf/dataset/, or dataset=file.yaml)
    item: Optional[str] = None          # the dataset run of this job, <item name>/<prompt index> (set by the sweep)
    model_memo: int = 1                 # loaded models kept for the next job of the same process (0: reload each job)


def validate_run(cfg: Any) -> None:
    """Range checks with actionable messages (types are checked by OmegaConf)."""
    def positive(name: str) -> None:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be >= 1 — use a positive number")

    for name in ("n_frames", "frame_stride", "n_steps", "keyframe_stride", "chunk_size"):
        positive(name)
    seed = getattr(cfg, "seed", 0)
    if seed is not None and not 0 <= seed < 2**63:
        raise ConfigError(f"seed={seed} is outside 0..2^63-1 (what every random generator here accepts) — use a "
                          "smaller non-negative integer")
    memo = getattr(cfg, "model_memo", 1)
    if memo is not None and memo < 0:
        raise ConfigError(f"model_memo={memo} must be >= 0 — use 0 to reload the model in every job")
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value is not None and (value < 64 or value % 64):
            raise ConfigError(f"{name}={value} is not a multiple of 64 — use e.g. {max(64, round(value / 64) * 64)}")


ConfigStore.instance().store(name="run_schema", node=RunConfig)


# --- sweeps -------------------------------------------------------------------------------------


def multiples(base: Any, *factors: Any) -> str:
    """``${tokenflow.multiples:${n_steps},1,2,5}`` → ``"50,100,250"``: a sweep value of multiples of a setting
    (resolved once, when the sweep is expanded: for sweeps whose valid values depend on another key)."""
    if not factors:
        raise ConfigError(f"{MULTIPLES_RESOLVER}:{base} has no factors — list them, e.g. "
                          f"${{{MULTIPLES_RESOLVER}:${{n_steps}},1,2,5}}")
    return ",".join(str(int(base) * int(f)) for f in factors)


def register_sweep_resolvers() -> None:
    """Register ``${tokenflow.multiples:...}`` and ``${tokenflow.dataset_items:...}`` (idempotent)."""
    from tokenflow.cli.dataset import register_resolver

    if not OmegaConf.has_resolver(MULTIPLES_RESOLVER):
        OmegaConf.register_new_resolver(MULTIPLES_RESOLVER, multiples)
    register_resolver()


class ModelMemo:
    """Loaded models kept between the jobs of one process (a sweep's jobs reuse the model; bounded, LRU).

    Keyed by the resolved model node (source, device, dtype, cache folder, ...). A kept model is handed
    out again only if it is still what was loaded: the same parameter and buffer storages at the same
    version counters (no in-place torch op on a weight, no replaced weight; writes through ``.data``
    bypass version counters and are not seen), the same fingerprint, attention processors and module
    hooks; otherwise it is dropped and loaded afresh, so ``model.fingerprint`` stays the fingerprint of
    its weights. One console-script invocation owns one memo; in a launcher's worker process (joblib,
    submitit) an unpickled memo is that process's :data:`WORKER_MODELS`, so a worker's jobs share too.
    """

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[Any, tuple]] = OrderedDict()
        self.loads = 0
        self.reuses = 0

    def get(self, node: DictConfig | dict, capacity: int | None = None) -> tuple[Any, bool]:
        """The model of ``node`` (built with :func:`build`, or the kept one) and whether it was reused.

        ``capacity`` (models kept afterwards; 0: none) defaults to the memo's own."""
        capacity = self.capacity if capacity is None else capacity
        resolved = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        key = json.dumps(resolved, sort_keys=True, default=str)
        entry = self._entries.pop(key, None)
        if entry is not None and _model_state(entry[0]) != entry[1]:
            log.warning("the kept model %s was changed by a job (weights, hooks or processors); loading it again",
                        entry[0].identity)
            entry = None
        reused = entry is not None
        if not reused:  # make room first: the evicted model's memory is free before the new one loads
            while self._entries and len(self._entries) >= max(capacity, 1):
                self._entries.popitem(last=False)
        model = entry[0] if reused else build(node)
        self.reuses += reused
        self.loads += not reused
        if capacity > 0:
            self._entries[key] = (model, _model_state(model))
        while len(self._entries) > capacity:
            self._entries.popitem(last=False)
        return model, reused

    def clear(self) -> None:
        """Forget every kept model (their memory is freed once no job holds them)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self) -> tuple:
        return (worker_models, (self.capacity,))  # models never travel between processes


def _model_state(model: Any) -> tuple:
    """What must be unchanged for a kept model to be handed out again (cheap: no weight is read)."""
    tensors, hooks = [], 0
    for name, part in model.components().items():
        for key, t in list(part.named_parameters()) + list(part.named_buffers()):
            tensors.append((name, key, t.data_ptr(), t._version, t.dtype, str(t.device), t.requires_grad))
        for m in part.modules():
            hooks += len(m._forward_hooks) + len(m._forward_pre_hooks)
    processors = tuple(sorted((k, type(v).__qualname__) for k, v in model.denoiser.attn_processors.items()))
    return (model.fingerprint, str(model.device), str(model.dtype), hooks, processors, tuple(tensors))


#: The models kept by this process's jobs when it is a launcher's worker (joblib/loky, submitit): an
#: unpickled :class:`ModelMemo` is this one. Bounded by the capacity each job asks for; ``clear()`` empties it.
WORKER_MODELS = ModelMemo()


def worker_models(capacity: int = 1) -> ModelMemo:
    """This process's :data:`WORKER_MODELS` (the target of an unpickled memo)."""
    WORKER_MODELS.capacity = capacity
    return WORKER_MODELS
