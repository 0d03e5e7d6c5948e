"""Dataset manifests: many videos, each with its prompts, edited as one Hydra sweep.

A manifest (``conf/dataset/<name>.yaml``, or any YAML file given as ``dataset=path/to/file.yaml``)::

    items:
      - name: wolf                # optional: default the video's file stem; names must be unique
        video: sample             # a file, a folder of frames or "sample"; relative to `root` when set
        prompts: [a robotic wolf, a fox]
        inversion_prompt: a wolf  # optional
        size: [64, 64]            # optional: [height, width] or one number (square); default the run's
        frames: 4                 # optional: first n frames; default the run's n_frames
    root: null                    # optional folder the relative video paths are relative to

``tokenflow-edit -m dataset=<name or file>`` runs one job per item x prompt: the shipped files set
``hydra.sweeper.params.item`` to ``${tokenflow.dataset_items:${dataset}}``, which lists the runs as
``<name>/<prompt index>`` (``item=wolf/1`` on the command line selects runs). Each job applies its run's
settings (:func:`apply_item`) before anything else, except keys given on the command line: the
manifest sets per-item defaults, the command line overrides them for every item.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokenflow.errors import ConfigError

RESOLVER = "tokenflow.dataset_items"
ITEM_KEYS = ("video", "prompt", "inversion_prompt", "height", "width", "n_frames")  # what a run sets
SWEEP = {"sweeper": {"params": {"item": "${" + RESOLVER + ":${dataset}}"}}}  # the `hydra:` block of a manifest


@dataclass
class DatasetItem:
    """One input clip of a manifest and the prompts it is edited with."""

    video: str
    prompts: list[str]
    name: Optional[str] = None
    inversion_prompt: Optional[str] = None
    size: Optional[Any] = None      # [height, width], one number (square), or None (the run's)
    frames: Optional[int] = None    # first n frames, or None (the run's n_frames)

    def settings(self, prompt_index: int, root: str | None) -> dict[str, Any]:
        """The run keys (:data:`ITEM_KEYS`) this item sets for its ``prompt_index``-th prompt."""
        video = self.video
        if root and video != "sample" and not Path(video).expanduser().is_absolute():
            video = str(Path(root).expanduser() / video)
        out: dict[str, Any] = {"video": video, "prompt": self.prompts[prompt_index]}
        if self.inversion_prompt is not None:
            out["inversion_prompt"] = self.inversion_prompt
        if self.size is not None:
            out["height"], out["width"] = self.size if isinstance(self.size, (list, tuple)) else (self.size, self.size)
        if self.frames is not None:
            out["n_frames"] = self.frames
        return out


@dataclass
class Dataset:
    """A manifest: items (each a clip with prompts) and the folder relative video paths start from."""

    items: list[DatasetItem]
    root: Optional[str] = None
    name: Optional[str] = None

    def runs(self) -> list[str]:
        """Every run of the dataset as ``<item name>/<prompt index>``, in manifest order."""
        return [f"{item.name}/{k}" for item in self.items for k in range(len(item.prompts))]

    def run(self, run_id: str) -> tuple[DatasetItem, int]:
        """The item and prompt index of ``<name>/<k>``; a ConfigError naming the valid runs otherwise."""
        name, _, index = str(run_id).rpartition("/")
        for item in self.items:
            if item.name == name and index.isdigit() and int(index) < len(item.prompts):
                return item, int(index)
        listed = ", ".join(self.runs()[:6]) + (", ..." if len(self.runs()) > 6 else "")
        raise ConfigError(f"item={run_id} is not a run of the dataset — use <name>/<prompt index>: {listed}")


def load_dataset(node: Any) -> Dataset:
    """Validate a manifest (a mapping, DictConfig or YAML file path): one line naming the bad entry on error."""
    if isinstance(node, (str, os.PathLike)):
        path = Path(node).expanduser()
        if not path.is_file():
            raise ConfigError(f"dataset={node}: no such manifest file — give a YAML file or a name in conf/dataset/")
        node = OmegaConf.load(path)
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(raw, dict) or not isinstance(raw.get("items"), list) or not raw["items"]:
        raise ConfigError("dataset: the manifest has no `items:` list — list items with video and prompts "
                          "(see conf/dataset/davis_sample.yaml)")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(Dataset)})
    if unknown:
        raise ConfigError(f"dataset: unknown key {unknown[0]!r} — a manifest has items, root and name")
    items, seen = [], set()
    for i, entry in enumerate(raw["items"]):
        item = _item(i, entry)
        if item.name in seen:
            raise ConfigError(f"dataset.items[{i}]: a second item named {item.name!r} — give each item a distinct "
                              "name:")
        seen.add(item.name)
        items.append(item)
    return Dataset(items=items, root=raw.get("root"), name=raw.get("name"))


def _item(i: int, entry: Any) -> DatasetItem:
    where = f"dataset.items[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is {entry!r}, not a mapping — give video: and prompts:")
    try:
        item = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DatasetItem), entry))
    except OmegaConfBaseException as e:
        key = getattr(e, "key", None) or "?"
        raise ConfigError(f"{where}.{key}: {str(e).splitlines()[0]} — items take video, prompts, name, "
                          "inversion_prompt, size, frames") from None
    if not item.prompts or not all(isinstance(p, str) and p.strip() for p in item.prompts):
        raise ConfigError(f"{where}.prompts={item.prompts!r} — give at least one non-empty prompt")
    size = item.size
    if size is not None:
        pair = list(size) if isinstance(size, (list, tuple)) else [size, size]
        if len(pair) != 2 or not all(isinstance(v, int) and v >= 64 and v % 64 == 0 for v in pair):
            raise ConfigError(f"{where}.size={size!r} — use [height, width] in multiples of 64, e.g. [512, 512]")
    if item.frames is not None and item.frames < 1:
        raise ConfigError(f"{where}.frames={item.frames} must be >= 1 — or leave it out for the run's n_frames")
    if item.name is None:
        item.name = "sample" if item.video == "sample" else Path(item.video).stem
    if not item.name or "/" in item.name or "," in item.name:
        raise ConfigError(f"{where}.name={item.name!r} — use a name without '/' or ','")
    return item


def dataset_runs(node: Any) -> str:
    """The ``${tokenflow.dataset_items:${dataset}}`` resolver: the runs as a Hydra sweep value ``a/0,a/1,b/0``."""
    if node is None:
        raise ConfigError("hydra.sweeper.params.item needs a dataset — select one with dataset=<name or file.yaml>")
    return ",".join(load_dataset(node).runs())


def register_resolver() -> None:
    """Register ``${tokenflow.dataset_items:...}`` (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, dataset_runs)


def register_manifest_files(args: list[str]) -> list[str]:
    """Make ``dataset=path/to/file.yaml`` an option of the ``dataset`` group (registered in Hydra's
    ConfigStore; a plain manifest gets the sweep block added). Returns ``args`` with absolute paths made
    relative to the current folder (Hydra's config names cannot start with '/')."""
    from hydra.core.config_store import ConfigStore

    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") == "dataset" and value.endswith((".yaml", ".yml")) and "," not in value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"dataset={value}: no such manifest file — check the path, or use a name in "
                                  "conf/dataset/")
            value = value if not path.is_absolute() else os.path.relpath(path)
            node = {"dataset": manifest_data(OmegaConf.to_container(OmegaConf.load(path)), value), "hydra": SWEEP}
            group, _, name = f"dataset/{value}".rpartition("/")
            ConfigStore.instance().store(group=group, name=name, node=node, package="_global_")
            arg = f"{key}={value}"
        out.append(arg)
    return out


def manifest_data(content: Any, where: str = "dataset") -> dict[str, Any]:
    """A manifest file's content as plain data, validated: the manifest itself (``items``, ``root``, ``name``),
    either at the top level or under ``dataset:`` beside the documented ``hydra:`` sweep block; nothing else.

    A manifest is data: any other key (``editor:``, ``defaults:``, ``hydra.callbacks``, ...), a ``_target_``
    or an interpolation (``${...}``: resolvers have side effects) is refused in one line naming it, so nothing
    in the file is ever instantiated or resolved."""
    if not isinstance(content, dict):
        raise ConfigError(f"dataset={where}: the file holds {type(content).__name__}, not a manifest — give `items:` "
                          "(see conf/dataset/davis_sample.yaml)")
    if "dataset" in content:
        extra = sorted(set(content) - {"dataset", "hydra"})
        if extra:
            raise ConfigError(f"dataset={where}: unknown key {extra[0]!r} — a manifest file holds `dataset:` (items, "
                              "root, name) and its `hydra:` sweep block only")
        if "hydra" in content and content["hydra"] != SWEEP:
            raise ConfigError(f"dataset={where}: the `hydra:` block may only be the sweep over the manifest's items "
                              f"({SWEEP}) — settings of runs belong on the command line")
        content = content["dataset"]
    _refuse_interpolations(content, where)
    load_dataset(content)  # items, root and name only: every unknown key is refused here
    return content


def _refuse_interpolations(value: Any, where: str, key: str = "dataset") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_interpolations(v, where, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_interpolations(v, where, f"{key}[{i}]")
    elif isinstance(value, str) and "${" in value:
        raise ConfigError(f"dataset={where}: {key}={value!r} is an interpolation — a manifest is data: write the value "
                          "itself")


def apply_item(cfg: DictConfig, given: set[str]) -> dict[str, Any]:
    """Set the run keys of ``cfg.item`` from ``cfg.dataset``, except the keys in ``given`` (the command
    line's); returns what was set. No dataset: nothing. A dataset without an item outside a sweep: error."""
    if cfg.get("dataset") is None:
        if cfg.get("item") is not None:
            raise ConfigError(f"item={cfg.item} but no dataset is selected — add dataset=<name or file.yaml>")
        return {}
    if cfg.get("item") is None:
        raise ConfigError("dataset= runs every item as a sweep — add -m (or item=<name>/<prompt index> for one run)")
    dataset = load_dataset(cfg.dataset)
    item, index = dataset.run(str(cfg.item))
    settings = {k: v for k, v in item.settings(index, dataset.root).items() if k not in given}
    for key, value in settings.items():
        cfg[key] = value
    return settings
