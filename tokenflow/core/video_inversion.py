"""Inverting a whole video: encode its frames, find its inversion in the cache (a verified entry, under the entry's
lock while one process computes it), or invert it (split by frame chunks across processes) and publish it."""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext

import torch
from torch import Tensor

from tokenflow.core.distributed import Ranks, invert_split, splits_frames
from tokenflow.core.inversion import Inverter, kept_timesteps
from tokenflow.digests import video_fingerprint
from tokenflow.models.trajectory import FileTrajectory, InversionResult, TeeTrajectory
from tokenflow.storage.cache import EntryWriter, InversionCache, cache_key
from tokenflow.storage.video import Video

log = logging.getLogger(__name__)


def invert_video(model, video: Video, inverter: Inverter, prompt: str, cache: InversionCache | None = None,
                 progress: bool = True, temp_dir: str | None = None,
                 ranks: Ranks | None = None) -> tuple[InversionResult, bool]:
    """Encode and invert ``video`` (cached by content); returns (inversion, cache_hit).

    The trajectory is written to disk as it is computed and read back one timestep at a time: into an
    anonymous temporary file in ``temp_dir`` (default ``$TMPDIR``; gone when the result is dropped or the
    process dies) and, with a cache, also into the cache entry (published when complete; a later hit
    reads from the entry). Frames are encoded ``model.vae_batch`` at a time from uint8. On a miss the
    entry's lock (:meth:`InversionCache.lock`) is held while computing: a process that misses the same
    entry meanwhile waits, then hits what this one published.

    With several processes (``ranks``, default the current ``torch.distributed`` group; every rank calls this
    with the same arguments): rank 0 alone checks, locks and writes the cache, and its hit or miss is every
    rank's (on a hit each rank loads the entry, reading only); a miss is inverted by frame chunks round-robin
    where the inverter can split (:func:`~tokenflow.core.distributed.splits_frames`), else by every rank in full.
    """
    return invert_or_load(model, video, inverter, prompt, cache, progress, temp_dir, ranks or Ranks.current())[:2]


def invert_or_load(model, video: Video, inverter: Inverter, prompt: str, cache: InversionCache | None, progress: bool,
            temp_dir: str | None, ranks: Ranks) -> tuple[InversionResult, bool, int]:
    """:func:`invert_video`, and the number of frames this process inverted (0 on a cache hit)."""
    key = cache_key(video=video_fingerprint(video), model=model.fingerprint, inverter=inverter.settings(), prompt=prompt)
    where = f" ({ranks.label})" if ranks.distributed else ""

    def cached(cache: InversionCache) -> InversionResult | None:
        hit = cache.load(key)
        problem = None if hit is None else entry_mismatch(hit, model, video, inverter, prompt)
        if hit is not None and problem is None:
            return hit
        if hit is not None:  # verified bytes, but not what this inversion computes (forged or foreign): recompute
            log.warning("inversion cache entry %s does not match this inversion (%s): recomputing it", key, problem)
            hit.trajectory.close()
            cache.remove(key)
        return None

    def loaded(cache: InversionCache) -> InversionResult | None:
        """A non-zero rank's read of the entry rank 0 has just verified (it removes nothing of a mismatch)."""
        hit = cache.load(key)
        if hit is not None and entry_mismatch(hit, model, video, inverter, prompt) is not None:
            hit.trajectory.close()
            return None
        return hit

    if (hit := _agreed_hit(cache, ranks, cached, loaded)) is not None:
        log.info("inversion cache hit %s%s", key, where)
        return hit, True, 0
    with cache.lock(key) if cache is not None and ranks.main else nullcontext():
        if (hit := _agreed_hit(cache, ranks, cached, loaded)) is not None:  # published while rank 0 waited
            log.info("inversion cache hit %s (computed by another process meanwhile)%s", key, where)
            return hit, True, 0
        clean = encode_video(model, video)
        shape = (len(set(kept_timesteps(inverter, model, tuple(clean.shape[-2:])))), *clean.shape)
        writer = cache.writer(key, shape) if cache is not None and ranks.main else None
        trajectory = FileTrajectory.temporary(shape, folder=temp_dir)
        try:
            result, frames = _invert_frames(model, clean, inverter, prompt, trajectory, writer, ranks, progress)
            result.trajectory = trajectory
        except BaseException:
            if writer is not None:
                writer.discard()
            trajectory.close()
            raise
        if writer is not None:
            writer.publish(key, result, video=video.source, model=model.identity, n_frames=video.n_frames,
                           size=[video.height, video.width])
    return result, False, frames


def _agreed_hit(cache: InversionCache | None, ranks: Ranks, cached, loaded) -> InversionResult | None:
    """The cache entry, when rank 0 finds it (``cached``) and, with several processes, every rank loads it
    (``loaded``); else None on every rank. Every rank calls this at the same point (the decision is collective)."""
    hit = cached(cache) if cache is not None and ranks.main else None
    if not ranks.distributed:
        return hit
    if not ranks.decide(hit is not None):
        return None
    if not ranks.main:
        hit = loaded(cache) if cache is not None else None
    if ranks.all(hit is not None):
        return hit
    if hit is not None:  # some rank could not read the entry: every rank computes (rank 0 rewrites it)
        hit.trajectory.close()
    log.warning("the inversion cache entry could not be read on every rank: recomputing it")
    return None


def _invert_frames(model, clean: Tensor, inverter: Inverter, prompt: str, trajectory: FileTrajectory,
                   writer: "EntryWriter | None", ranks: Ranks, progress: bool) -> tuple[InversionResult, int]:
    """Invert ``clean`` into ``trajectory`` (and the cache entry ``writer``); returns (result, frames this process
    inverted). With several processes the frame chunks are split among them where ``inverter`` can."""
    copies = () if writer is None else (writer.trajectory,)
    if ranks.distributed and splits_frames(inverter):
        return invert_split(inverter, model, clean, prompt, trajectory, ranks, copies, progress)
    if ranks.distributed:
        log.info("%s cannot split the inversion by frames: %s inverts all %d frames itself",
                 type(inverter).__name__, ranks.label, clean.shape[0])
    store = trajectory if writer is None else TeeTrajectory(trajectory, *copies)
    return inverter.invert_into(model, clean, prompt, store, progress=progress), int(clean.shape[0])


def entry_mismatch(entry: InversionResult, model, video: Video, inverter: Inverter, prompt: str) -> str | None:
    """Why a loaded cache entry is not the inversion ``inverter`` would compute for ``video``, or None.

    The checksum proves the file is what was written; this proves it is what was asked: the inverter's kept
    timesteps (noisiest first), one latent per frame at the model's latent size, the same settings and prompt."""
    factor = model.vae_scale_factor
    expected = sorted(set(kept_timesteps(inverter, model, (video.height // factor, video.width // factor))), reverse=True)
    if list(entry.timesteps) != expected:
        return f"timesteps {entry.timesteps[:3]}... where the inverter keeps {expected[:3]}..."
    shape = (video.n_frames, model.latent_channels, video.height // factor, video.width // factor)
    if tuple(entry.clean.shape) != shape or tuple(entry.trajectory.shape) != (len(expected), *shape):
        return f"latents {tuple(entry.trajectory.shape)} where the video needs {(len(expected), *shape)}"
    if json.dumps(entry.settings, sort_keys=True, default=str) != json.dumps(inverter.settings(), sort_keys=True,
                                                                             default=str):
        return "other inverter settings"
    if entry.prompt != prompt:
        return f"inversion prompt {entry.prompt!r}"
    return None


def encode_video(model, video: Video) -> Tensor:
    """Clean latents (N, C, h, w) float32 of ``video``'s frames, encoded ``model.vae_batch`` frames at a time (only
    that many frames are ever float32 in memory)."""
    step = max(1, int(model.vae_batch))
    return torch.cat([model.encode_images(video.to_tensor(slice(i, i + step)))
                      for i in range(0, video.n_frames, step)]).contiguous()
