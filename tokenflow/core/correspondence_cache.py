"""Nearest-neighbour fields of one edit on disk, reusable by edits that differ only in the prompt.

TokenFlow's correspondences are computed on the *source* branch — the inverted video under the
inversion prompt — so for a fixed video, keyframe schedule and propagator they are the same whatever
the target prompt, guidance or editor settings. A sweep over prompts records them in its first job and
reads them back in the others: no search, and an editor that needs no source branch of its own
(SDEdit, ControlNet with a CFG base) then runs without one — 2 instead of 3 branches per UNet call.

A record is a folder: one safetensors file per timestep (per layer: the (frame, keyframe) pairs and
their (pairs, S) neighbour indices) and ``complete.json``, written last, that makes it usable. A record
is keyed by everything the fields depend on (:func:`record_key`); files are written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from tokenflow.atomic import atomic_file, read_safetensors, write_json

log = logging.getLogger(__name__)
FORMAT = 1


def record_key(**parts: Any) -> str:
    """Stable hash of what the fields depend on (JSON-serialisable parts; tensors by their bytes)."""
    h = hashlib.sha256(f"correspondences-{FORMAT}".encode())
    for name in sorted(parts):
        value = parts[name]
        h.update(name.encode())
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


class CorrespondenceRecord:
    """The fields of one run: ``lookup`` them when the record is complete, else ``record`` them as they come."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.complete = (self.folder / "complete.json").is_file()
        self._timestep: int | None = None
        self._pending: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._loaded: tuple[int, dict[str, dict[tuple[int, int], Tensor]]] | None = None

    # ---- reading ---------------------------------------------------------------------------------
    def lookup(self, timestep: int, layer: str, frames: Tensor, keyframes: Tensor) -> Tensor:
        """Neighbour indices (R, S) for the pairs (frames[r], keyframes[r]) at ``layer`` and ``timestep``."""
        table = self._table(timestep)
        try:
            rows = [table[layer][(int(f), int(k))] for f, k in zip(frames.tolist(), keyframes.tolist())]
        except KeyError:
            raise RuntimeError(f"the correspondence record {self.folder} has no field for layer {layer} at "
                               f"t={timestep} — it belongs to another keyframe schedule; delete it") from None
        return torch.stack(rows).long()

    def _table(self, timestep: int) -> dict[str, dict[tuple[int, int], Tensor]]:
        if self._loaded is None or self._loaded[0] != timestep:
            tensors = read_safetensors(self.folder / f"t{timestep}.safetensors")
            table: dict[str, dict[tuple[int, int], Tensor]] = {}
            for name in {k.rsplit(".", 1)[0] for k in tensors}:
                pairs, index = tensors[f"{name}.pairs"], tensors[f"{name}.index"]
                table[name] = {(int(f), int(k)): index[r] for r, (f, k) in enumerate(pairs.tolist())}
            self._loaded = (timestep, table)
        return self._loaded[1]

    # ---- writing ---------------------------------------------------------------------------------
    def record(self, timestep: int, layer: str, frames: Tensor, keyframes: Tensor, index: Tensor) -> None:
        """Keep the fields of pairs (frames[r], keyframes[r]); a new timestep writes the previous one out."""
        if self._timestep is not None and timestep != self._timestep:
            self._flush()
        self._timestep = timestep
        pairs = torch.stack([frames.cpu().long(), keyframes.cpu().long()], 1)
        small = index.detach().to("cpu", torch.int32)
        self._pending.setdefault(layer, []).append((pairs, small))

    def _flush(self) -> None:
        if self._timestep is None or not self._pending:
            return
        tensors = {}
        for layer, parts in self._pending.items():
            tensors[f"{layer}.pairs"] = torch.cat([p for p, _ in parts]).contiguous()
            tensors[f"{layer}.index"] = torch.cat([i for _, i in parts]).contiguous()
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / f"t{self._timestep}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        self._pending.clear()

    def finish(self, info: dict[str, Any]) -> None:
        """Write the last timestep and mark the record complete (only complete records are read)."""
        self._flush()
        self._timestep = None
        write_json(self.folder / "complete.json", info)
        self.complete = True
        log.info("correspondences recorded in %s for the next edits of this video", self.folder)
