"""The TokenFlow pipeline: invert, then at each timestep edit keyframes jointly, propagate, step.

Composes a model, an ``Inverter``, a ``KeyframeEditor``, a ``Propagator`` and a keyframe schedule;
none knows the others' internals. Usable without Hydra::

    pipe = TokenFlowPipeline(model, PnPEditor(), TokenFlowPropagator(), RandomKeyframes(stride=8))
    result = pipe(video, prompt="a robotic wolf", inversion_prompt="a wolf")
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenflow.core.attention import KeyframeAttention, TokenFlowRuntime
from tokenflow.core.correspondence_cache import record_key
from tokenflow.core.distributed import Ranks, invert_split, splits_frames
from tokenflow.core.editor import SOURCE, Branch, BranchCall, EditInputs, KeyframeEditor, Step, check_pairing
from tokenflow.core.inversion import DDIMInverter, Inverter, image_seq_len, kept_timesteps
from tokenflow.core.keyframes import KeyframeSchedule, RandomKeyframes
from tokenflow.core.numerics import check_latents, likely_cause
from tokenflow.core.propagation import CorrespondenceCallback, PropagationInputs, Propagator, TokenFlowPropagator
from tokenflow.errors import ConfigError
from tokenflow.models.backbone import TextEmbedding
from tokenflow.models.loading import as_model
from tokenflow.models.trajectory import FileTrajectory, InversionResult, TeeTrajectory
from tokenflow.samplers import Grid, Sampler, model_sampler
from tokenflow.storage.cache import EntryWriter, InversionCache, cache_key
from tokenflow.storage.video import Video, frames_from_tensor, video_fingerprint

log = logging.getLogger(__name__)


class FrameSink(Protocol):
    """Where decoded frames go as they are produced (:class:`~tokenflow.storage.video.VideoWriter`, ``FrameWriter``)."""

    def write(self, frames: np.ndarray) -> None: ...


@dataclass
class EditResult:
    frames: "Any"                   # (N, H, W, 3) uint8, or None when the edit streamed them (keep_frames=False)
    latents: Tensor                 # (N, C, h, w) edited clean latents
    keyframes: list[list[int]]      # keyframes drawn at each step
    timesteps: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: int = 0       # image-UNet evaluations (batch elements) in the edit


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
    return _invert(model, video, inverter, prompt, cache, progress, temp_dir, ranks or Ranks.current())[:2]


def _invert(model, video: Video, inverter: Inverter, prompt: str, cache: InversionCache | None, progress: bool,
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


class TokenFlowPipeline:
    """Edit a video with a keyframe editor and a propagator, diffusers-pipeline style.

    ``model``: a :class:`~tokenflow.models.DiffusionModel` or a loaded diffusers SD/SDXL pipeline.
    """

    def __init__(self, model, editor: KeyframeEditor, propagator: Propagator | None = None,
                 keyframes: KeyframeSchedule | None = None, inverter: Inverter | None = None,
                 n_steps: int = 50, chunk_size: int = 8, cache: InversionCache | None = None,
                 attention: KeyframeAttention | None = None, ranks: Ranks | None = None) -> None:
        if n_steps < 1 or chunk_size < 1:
            raise ConfigError(f"n_steps={n_steps} and chunk_size={chunk_size} must be >= 1 — use positive numbers")
        self.model, self.editor = as_model(model), editor
        self.propagator = propagator or TokenFlowPropagator()
        self.attention = attention or KeyframeAttention()
        self.ranks = ranks or Ranks.current()  # several processes share the chunk passes (tokenflow.core.distributed)
        if self.attention.bounded and not self.propagator.reuses_keyframe_pass:
            raise ConfigError(f"attention.context=anchors needs a propagator that reproduces keyframes exactly "
                              f"(the paper blend); {type(self.propagator).__name__} does not — use propagator.blend=paper "
                              "or attention.context=all")
        self.keyframes = keyframes or RandomKeyframes()
        self.inverter = inverter or DDIMInverter(n_steps=n_steps, keep_steps=n_steps)
        self.n_steps, self.chunk_size, self.cache = n_steps, chunk_size, cache
        # the model's scheduler config decides the sampler, for the inversion as for the edit (and it enters the
        # model's fingerprint, so cached inversions never mix samplers): to sample otherwise, set model.scheduler
        self.sampler: Sampler = model_sampler(self.model)
        self.layout = self.model.layout()
        self.unet_evaluations = 0

    # ---- one UNet call over branches -------------------------------------------------------------
    def _predict(self, x: Tensor, inversion: InversionResult, step: Step, level) -> dict[str, Tensor]:
        """Predictions by branch, in the sampler's guidance form (ε, velocity), for edited latents ``x`` (F, C, h, w)
        of ``step.frames`` at ``level``, float32."""
        frames = step.frames.cpu()
        latents, texts, images, extras, guidance = [], [], [], [], []
        for branch in step.branches:
            if branch.make_latents is not None:
                z = branch.make_latents(x, step).to(x)
            else:
                z = x if branch.latents == "edit" else inversion.at(step.timestep, frames).to(x)
            text = branch.text.rows(frames)
            latents.append(z)
            guidance += [branch.guidance] * len(z)
            texts.append(text)
            images.append(None if branch.image_latents is None else _rows(branch.image_latents, frames))
            extras.append(None if branch.unet_inputs is None else
                          branch.unet_inputs(BranchCall(z, step.timestep, frames, text, step)))
        if any(i is None for i in images) and not all(i is None for i in images):
            raise ConfigError("some branches carry image latents and some do not — give every branch image_latents "
                              "(zeros for an image-free branch)")
        image = None if images[0] is None else torch.cat([i.to(x) for i in images])
        batch = torch.cat(latents)
        out = self.model.predict(batch, step.timestep, TextEmbedding.cat(texts), image_latents=image,
                                 extra=_merge_unet_inputs(extras, [len(z) for z in latents]),
                                 **self._guidance_input(guidance))
        eps = self.sampler.to_form(out, batch, level)
        self.unet_evaluations += batch.shape[0]
        return dict(zip(step.names, eps.chunk(len(step.branches))))

    def _guidance_input(self, rows: list[float | None]) -> dict[str, Tensor]:
        """``guidance=`` for the model call: one value per row (the model's default where a branch names none), or
        nothing when no branch names one."""
        if all(g is None for g in rows):
            return {}
        if not getattr(self.model, "guidance_embedded", False):
            raise ConfigError(f"a branch sets a guidance input but '{self.model.identity}' has none (only guidance-"
                              "distilled models such as FLUX.1-dev read one) — leave Branch.guidance None")
        default = float(self.model.guidance)
        return {"guidance": torch.tensor([default if g is None else float(g) for g in rows], dtype=torch.float32)}

    def _branches(self, step: Step, source: Branch | None) -> tuple[Branch, ...]:
        edit = tuple(self.editor.branches(step))
        return edit if source is None or any(b.name == SOURCE for b in edit) else (source,) + edit

    def step_frames(self, runtime: TokenFlowRuntime, x: Tensor, inversion: InversionResult, index: int,
                    timesteps: "Grid | list[int]", frames: Tensor, keyframes: Tensor, phase: str,
                    source: Branch | None) -> Tensor:
        """One model call and sampler step for ``frames`` of ``x`` in ``phase`` (keyframes/propagate/frames), at
        level ``index`` of ``timesteps`` (a :class:`~tokenflow.samplers.Grid`, or DDIM timesteps).

        Returns the new latents of those frames (F, C, h, w), float32 on the model's device.
        """
        grid = timesteps if isinstance(timesteps, Grid) else self.sampler.path(list(timesteps))
        level = grid.levels[index]
        t = level.timestep
        step = Step(index, t, len(grid), phase, frames, keyframes)  # type: ignore[arg-type]
        step.branches = self._branches(step, source)
        runtime.step = step
        try:
            xf = x[frames].to(self.model.device, torch.float32)
            eps = self.editor.guide(self._predict(xf, inversion, step, level), step)
            new = self.sampler.step(xf, eps, level, grid.after(index))
            return self.editor.step_end(new, step)
        finally:
            runtime.step = None

    def denoise_step(self, runtime: TokenFlowRuntime, x: Tensor, inversion: InversionResult, index: int,
                     timesteps: "Grid | list[int]", keyframes: list[int], source: Branch | None) -> Tensor:
        """One TokenFlow step over all frames: keyframe pass, then chunks with propagation → new latents.

        When the propagator reproduces a keyframe exactly (``reuses_keyframe_pass``), keyframes keep their
        keyframe-pass result and the chunk pass covers the other frames only. With several processes each
        computes the keyframe pass and its share of the chunks; the new latents are merged at the end.
        """
        args = (runtime, x, inversion, index, timesteps)
        out = torch.zeros_like(x)
        owned = torch.zeros(x.shape[0], dtype=torch.bool)
        everything = torch.arange(x.shape[0])
        if not self.propagator.uses_keyframes:
            for c, frames in enumerate(_chunks(everything, self.chunk_size)):
                if self.ranks.owns(c):
                    out[frames] = self.step_frames(*args, frames, torch.empty(0, dtype=torch.long), "frames", source).to(out)
                    owned[frames] = True
            return self.ranks.merge(out, owned)
        runtime.clear_step()
        kf = torch.tensor(sorted(keyframes), dtype=torch.long)
        if self.attention.bounded:
            return self._denoise_segments(args, out, owned, kf, source)
        out[kf] = self.step_frames(*args, kf, kf, "keyframes", source).to(out)  # also fills runtime.keyframe_tokens
        reuse = self.propagator.reuses_keyframe_pass
        owned[kf] = self.ranks.main and reuse  # else keyframes are recomputed (and owned) in the chunk pass
        rest = everything[~torch.isin(everything, kf)] if reuse else everything
        for c, frames in enumerate(_chunks(rest, self.chunk_size)):
            if self.ranks.owns(c):
                out[frames] = self.step_frames(*args, frames, kf, "propagate", source).to(out)
                owned[frames] = True
        return self.ranks.merge(out, owned)

    def _denoise_segments(self, args: tuple, out: Tensor, owned: Tensor, kf: Tensor, source: Branch | None) -> Tensor:
        """Bounded keyframe context (``attention.context=anchors``): anchors jointly, then the video in segments
        of ``attention.segment`` keyframes, each keyframe attending to itself and the anchors, each segment's
        frames propagated from its keyframes before the next segment starts; only the keyframes still needed
        are held. With several processes, segments go round-robin; a rank also recomputes the keyframes of the
        segment before each of its own (the same calls as a single process would make) for the boundary."""
        runtime = args[0]
        n = out.shape[0]
        picks = torch.linspace(0, len(kf) - 1, min(self.attention.anchors, len(kf))).round().long().unique()
        anchors = kf[picks]
        out[anchors] = self.step_frames(*args, anchors, kf, "anchors", source).to(out)
        owned[anchors] = self.ranks.main
        others = kf[~torch.isin(kf, anchors)]
        segments = kf.split(self.attention.segment)
        for s, segment in enumerate(segments):
            mine, boundary = self.ranks.owns(s), s + 1 < len(segments) and self.ranks.owns(s + 1)
            if not (mine or boundary):
                continue
            for chunk in _chunks(others[torch.isin(others, segment)], self.chunk_size):
                if mine or int(segment[-1]) in chunk.tolist():
                    out[chunk] = self.step_frames(*args, chunk, kf, "anchored", source).to(out)
                    owned[chunk] = mine
            first = 0 if s == 0 else int(segments[s - 1][-1]) + 1
            last = n - 1 if s == len(segments) - 1 else int(segment[-1])
            frames = torch.arange(first, last + 1)
            if mine:
                for chunk in _chunks(frames[~torch.isin(frames, kf)], self.chunk_size):
                    out[chunk] = self.step_frames(*args, chunk, kf, "propagate", source).to(out)
                    owned[chunk] = True
            later = {int(k) for k in anchors if int(k) > last}
            runtime.keep_keyframes({int(segment[-1])} | later)  # the boundary keyframe and anchors still to come
        return self.ranks.merge(out, owned)

    def source_branch(self, inversion_prompt: str) -> Branch | None:
        """The source branch (inverted latents, inversion prompt) if the editor or the propagator needs it."""
        if not (self.editor.needs_source or self.propagator.needs_source):
            return None
        return self.editor.source_branch(Branch(SOURCE, self.model.encode_text(inversion_prompt), latents="source",
                                                joint=False))

    # ---- the whole edit --------------------------------------------------------------------------
    def edit(self, inversion: InversionResult, prompt: str, negative_prompt: str = "", inversion_prompt: str | None = None,
             progress: bool = True, on_match: CorrespondenceCallback | None = None,
             video: Video | None = None, output: FrameSink | Sequence[FrameSink] = (),
             keep_frames: bool = True, on_schedule: Callable[[list[list[int]]], None] | None = None) -> EditResult:
        """Edit from an existing inversion; returns decoded frames and what was done.

        ``video``: the input frames, for propagators that read pixels (optical flow); optional.
        ``output``: sinks (e.g. a ``VideoWriter`` and a ``FrameWriter``) given the frames as they are decoded,
        ``model.vae_batch`` at a time; with ``keep_frames=False`` the frames are not gathered (``frames`` is
        None) and decoding needs memory for one batch only, whatever the video's length.
        ``on_schedule``: called with the keyframes of every step once they are drawn, before the first step (e.g.
        to check memory again after an adaptive cut; it may raise to stop the run).
        """
        levels = self.sampler.grid(self.n_steps, image_seq_len(self.model, tuple(inversion.clean.shape[-2:])))
        grid = levels.timesteps
        inputs = EditInputs(self.model, inversion, prompt, negative_prompt,
                            inversion.prompt if inversion_prompt is None else inversion_prompt, grid,
                            None if video is None else video.frames, sampler=self.sampler)
        check_pairing(self.editor, self.model, self.sampler)
        self.editor.check(self.model)
        self.editor.prepare(inputs)
        timesteps = self.editor.timesteps(grid)
        path = levels[len(levels) - len(timesteps):]
        if path.timesteps != list(timesteps):  # not a tail of the grid: a custom editor's own timesteps
            path = self.sampler.path(list(timesteps))
        missing = [t for t in timesteps if not inversion.has(t)]
        if missing and self.editor.needs_inversion and (self.editor.needs_source or self.propagator.uses_keyframes):
            raise ConfigError(f"the inversion has no latents at timesteps {missing[:3]} — invert with keep_steps={self.n_steps}")
        x = self.editor.initial_latents(inputs, timesteps).to(self.model.device, torch.float32)  # on the device: no
        # host round trip per UNet call
        schedule, features, clips = self._keyframe_schedule(inversion, inputs.inversion_prompt, path, video)
        if on_schedule is not None:
            on_schedule(schedule)
        latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        self.propagator.prepare(PropagationInputs(
            self.model, inversion, timesteps, schedule, latent_hw, None if video is None else video.frames,
            source_identity=self._source_identity(inversion, inputs.inversion_prompt), partial=self.ranks.distributed,
            layout=self.layout, features=features, clips=clips))
        source = self.source_branch(inputs.inversion_prompt)  # after prepare: what the propagator needs is known
        self.unet_evaluations = 0
        t0 = time.perf_counter()
        if self.attention.slimming == "reference" and features is None:
            raise ConfigError("attention.slimming=reference scores keyframe tokens with the video's features, which "
                              "only keyframes=adaptive computes — use keyframes=adaptive (experiment=reference_adaflow)")
        runtime = TokenFlowRuntime(self.editor, self.propagator, latent_hw=latent_hw, on_match=on_match,
                                   max_kv_frames=self.attention.slim_above,
                                   slim_features=features if self.attention.slimming == "reference" else None)
        runtime.install(self.model.denoiser, self.layout)
        try:
            with torch.no_grad():
                cause = likely_cause(self.model.dtype, self.editor.guidance_weight)
                for i in tqdm(range(len(timesteps)), desc="TokenFlow editing", unit="step", disable=not progress):
                    x = self.denoise_step(runtime, x, inversion, i, path, schedule[i], source)
                    check_latents(x, "edit", i, len(timesteps), timesteps[i], cause)
            self.propagator.finish()
        finally:
            runtime.remove()
        t_edit = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = decode_frames(self.model, x, [output] if hasattr(output, "write") else list(output), keep_frames)
        timings = {"editing_s": t_edit, "decoding_s": time.perf_counter() - t0}
        return EditResult(frames, x.cpu(), schedule, timesteps, timings, self.unet_evaluations)

    def _keyframe_schedule(self, inversion: InversionResult, inversion_prompt: str, path: Grid, video: Video | None
                           ) -> tuple[list[list[int]], Tensor | None, list[int] | None]:
        """Keyframes per editing step, and the features (N, h, w, C) and clip starts of a schedule that reads the
        video (adaptive clips; None otherwise): its features of every frame (``frame_features``: one pass over the
        clean latents at the path's least noisy level, or DIFT), shared with the propagator and the slimming."""
        n_steps = len(path.timesteps)
        if not self.keyframes.reads_features(inversion.n_frames) or not self.propagator.uses_keyframes:
            return self.keyframes.sequence(n_steps, inversion.n_frames), None, None
        features = self.keyframes.frame_features(self.model, inversion.clean, path.timesteps[-1], inversion_prompt,
                                                 self.chunk_size, None if video is None else video.frames)
        clips = self.keyframes.clips(features)
        schedule = self.keyframes.sequence(n_steps, inversion.n_frames, features=features, clips=clips)
        log.info("adaptive keyframes: %d clips (first frames %s)", len(clips), clips[:12])
        return schedule, features, clips

    def _source_identity(self, inversion: InversionResult, inversion_prompt: str) -> str:
        """What the source branch's tokens depend on: the model, the inversion, the source prompt and the editor
        (editors may shape the source branch); keys reusable correspondence records."""
        shaped = self.editor.source_settings()
        return record_key(model=self.model.fingerprint, settings=inversion.settings, prompt=inversion.prompt,
                          timesteps=inversion.timesteps, clean=inversion.clean, source_prompt=inversion_prompt,
                          editor=f"{type(self.editor).__module__}.{type(self.editor).__qualname__}",
                          **({} if shaped is None else {"editor_source": shaped}))

    def __call__(self, video: Video, prompt: str, negative_prompt: str = "", inversion_prompt: str = "",
                 progress: bool = True, on_match: CorrespondenceCallback | None = None,
                 output: FrameSink | Sequence[FrameSink] = (), keep_frames: bool = True,
                 on_schedule: Callable[[list[list[int]]], None] | None = None) -> EditResult:
        """Invert ``video`` (cached; the trajectory on disk) and edit it towards ``prompt`` (``output``,
        ``keep_frames``, ``on_schedule``: see :meth:`edit`)."""
        check_pairing(self.editor, self.model, self.sampler)  # before the inversion: a model the editor
        self.editor.check(self.model)  # cannot drive fails at once
        t0 = time.perf_counter()
        if self.editor.needs_inversion:  # with several processes: split by frame chunks (see invert_video)
            inversion, hit, inverted = _invert(self.model, video, self.inverter, inversion_prompt, self.cache, progress,
                                               None, self.ranks)
        else:  # inversion-free (FlowEdit): the encoded frames only, no trajectory on disk
            inversion, hit, inverted = InversionResult.clean_only(encode_video(self.model, video), inversion_prompt), False, 0
        t_inv = time.perf_counter() - t0
        result = self.edit(inversion, prompt, negative_prompt, inversion_prompt, progress, on_match, video=video,
                           output=output, keep_frames=keep_frames, on_schedule=on_schedule)
        result.timings = {"inversion_s": t_inv, "inversion_cache_hit": float(hit), "inversion_frames": float(inverted),
                          **result.timings}
        return result


def decode_frames(model, latents: Tensor, sinks: Sequence[FrameSink] = (), keep: bool = True) -> np.ndarray | None:
    """Decode latents (N, C, h, w) ``model.vae_batch`` frames at a time, handing each batch's (F, H, W, 3) uint8
    frames to every sink; returns all frames (N, H, W, 3) when ``keep``, else None."""
    kept = []
    for chunk in latents.split(max(1, int(model.vae_batch))):
        frames = frames_from_tensor(model.decode_latents(chunk))
        for sink in sinks:
            sink.write(frames)
        if keep:
            kept.append(frames)
    return np.concatenate(kept) if keep else None


def _chunks(frames: Tensor, size: int) -> tuple[Tensor, ...]:
    """``frames`` split into calls of at most ``size`` (none for an empty tensor)."""
    return frames.split(size) if len(frames) else ()


def _rows(t: Tensor, frames: Tensor) -> Tensor:
    """Rows of a (1 or N, ...) per-video tensor for ``frames``: the shared row repeated, or per-frame rows."""
    return t.expand(len(frames), *t.shape[1:]) if t.shape[0] == 1 else t[frames.to(t.device)]


def _merge_unet_inputs(parts: list[dict[str, Any] | None], sizes: list[int]) -> dict[str, Any]:
    """Concatenate branches' extra UNet inputs along the batch; a branch without one gets zeros of its size."""
    keys = [k for part in parts if part for k in part]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(keys):
        template = next(part[key] for part in parts if part and key in part)
        values = [part[key] if part and key in part else _zeros(template, n) for part, n in zip(parts, sizes)]
        merged[key] = _concat(values)
    return merged


def _zeros(template: Any, n: int) -> Any:
    if isinstance(template, Tensor):
        return template.new_zeros(n, *template.shape[1:])
    if isinstance(template, (list, tuple)):
        return type(template)(_zeros(t, n) for t in template)
    if isinstance(template, dict):
        return {k: _zeros(v, n) for k, v in template.items()}
    raise ConfigError(f"unet_inputs values must be tensors (or lists/dicts of them), got {type(template).__name__}")


def _concat(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(v)) for v in zip(*values))
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values]) for k in first}
    raise ConfigError(f"unet_inputs values must be tensors (or lists/dicts of them), got {type(first).__name__}")
