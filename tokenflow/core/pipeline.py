"""The TokenFlow pipeline: invert, then at each timestep edit keyframes jointly, propagate, step.

Composes a model, an ``Inverter``, a ``KeyframeEditor``, a ``Propagator`` and a keyframe schedule;
none knows the others' internals. Usable without Hydra::

    pipe = TokenFlowPipeline(model, PnPEditor(), TokenFlowPropagator(), RandomKeyframes(stride=8))
    result = pipe(video, prompt="a robotic wolf", inversion_prompt="a wolf")
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenflow.core.attention import KeyframeAttention, TokenFlowRuntime
from tokenflow.core.correspondence_cache import record_key
from tokenflow.core.batching import branch_rows, merge_model_inputs
from tokenflow.core.distributed import Ranks
from tokenflow.core.editor import SOURCE, Branch, BranchCall, EditInputs, KeyframeEditor, Latents, Phase, Step, check_pairing
from tokenflow.core.inversion import DDIMInverter, Inverter, image_seq_len
from tokenflow.core.keyframes import KeyframeSchedule, RandomKeyframes
from tokenflow.core.numerics import check_latents, likely_cause
from tokenflow.core.propagation import CorrespondenceCallback, PropagationInputs, Propagator, TokenFlowPropagator
from tokenflow.core.video_inversion import encode_video, invert_or_load
from tokenflow.errors import ConfigError
from tokenflow.models.backbone import TextEmbedding
from tokenflow.models.loading import as_model
from tokenflow.models.trajectory import InversionResult
from tokenflow.samplers import Grid, Sampler, model_sampler
from tokenflow.storage.cache import InversionCache
from tokenflow.storage.video import Video, frames_from_tensor

log = logging.getLogger(__name__)


class FrameSink(Protocol):
    """Where decoded frames go as they are produced (:class:`~tokenflow.storage.mp4.VideoWriter`, ``FrameWriter``)."""

    def write(self, frames: np.ndarray) -> None: ...


#: ``callback(pipe, step_index, timestep, callback_kwargs) -> dict | None``, diffusers' ``callback_on_step_end``
StepCallback = Callable[["TokenFlowPipeline", int, int, dict[str, Any]], "dict[str, Any] | None"]


@dataclass
class EditResult:
    frames: np.ndarray | None       # (N, H, W, 3) uint8, or None when the edit streamed them (keep_frames=False)
    latents: Tensor                 # (N, C, h, w) edited clean latents
    keyframes: list[list[int]]      # keyframes drawn at each step
    timesteps: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: int = 0       # image-UNet evaluations (batch elements) in the edit


class TokenFlowPipeline:
    """Edit a video with a keyframe editor and a propagator, diffusers-pipeline style.

    ``model``: a :class:`~tokenflow.models.DiffusionModel` or a loaded diffusers SD/SDXL pipeline.
    """

    #: the tensors a step-end callback may ask for (diffusers' ``_callback_tensor_inputs``)
    callback_tensor_inputs: tuple[str, ...] = ("latents", "keyframes")

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
                z = x if branch.latents is Latents.edit else inversion.at(step.timestep, frames).to(x)
            text = branch.text.rows(frames)
            latents.append(z)
            guidance += [branch.guidance] * len(z)
            texts.append(text)
            images.append(None if branch.image_latents is None else branch_rows(branch.image_latents, frames))
            extras.append(None if branch.unet_inputs is None else
                          branch.unet_inputs(BranchCall(z, step.timestep, frames, text, step)))
        if any(i is None for i in images) and not all(i is None for i in images):
            raise ConfigError("some branches carry image latents and some do not — give every branch image_latents "
                              "(zeros for an image-free branch)")
        image = None if images[0] is None else torch.cat([i.to(x) for i in images])
        batch = torch.cat(latents)
        out = self.model.predict(batch, step.timestep, TextEmbedding.cat(texts), image_latents=image,
                                 extra=merge_model_inputs(extras, [len(z) for z in latents]),
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
                    timesteps: "Grid | list[int]", frames: Tensor, keyframes: Tensor, phase: Phase,
                    source: Branch | None) -> Tensor:
        """One model call and sampler step for ``frames`` of ``x`` in ``phase`` (keyframes/propagate/frames), at
        level ``index`` of ``timesteps`` (a :class:`~tokenflow.samplers.Grid`, or DDIM timesteps).

        Returns the new latents of those frames (F, C, h, w), float32 on the model's device.
        """
        grid = timesteps if isinstance(timesteps, Grid) else self.sampler.path(list(timesteps))
        level = grid.levels[index]
        t = level.timestep
        step = Step(index, t, len(grid), phase, frames, keyframes)
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
                    out[frames] = self.step_frames(*args, frames, torch.empty(0, dtype=torch.long), Phase.frames, source).to(out)
                    owned[frames] = True
            return self.ranks.merge(out, owned)
        runtime.clear_step()
        kf = torch.tensor(sorted(keyframes), dtype=torch.long)
        if self.attention.bounded:
            return self._denoise_segments(args, out, owned, kf, source)
        out[kf] = self.step_frames(*args, kf, kf, Phase.keyframes, source).to(out)  # also fills runtime.keyframe_tokens
        reuse = self.propagator.reuses_keyframe_pass
        owned[kf] = self.ranks.main and reuse  # else keyframes are recomputed (and owned) in the chunk pass
        rest = everything[~torch.isin(everything, kf)] if reuse else everything
        for c, frames in enumerate(_chunks(rest, self.chunk_size)):
            if self.ranks.owns(c):
                out[frames] = self.step_frames(*args, frames, kf, Phase.propagate, source).to(out)
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
        out[anchors] = self.step_frames(*args, anchors, kf, Phase.anchors, source).to(out)
        owned[anchors] = self.ranks.main
        others = kf[~torch.isin(kf, anchors)]
        segments = kf.split(self.attention.segment)
        for s, segment in enumerate(segments):
            mine, boundary = self.ranks.owns(s), s + 1 < len(segments) and self.ranks.owns(s + 1)
            if not (mine or boundary):
                continue
            for chunk in _chunks(others[torch.isin(others, segment)], self.chunk_size):
                if mine or int(segment[-1]) in chunk.tolist():
                    out[chunk] = self.step_frames(*args, chunk, kf, Phase.anchored, source).to(out)
                    owned[chunk] = mine
            first = 0 if s == 0 else int(segments[s - 1][-1]) + 1
            last = n - 1 if s == len(segments) - 1 else int(segment[-1])
            frames = torch.arange(first, last + 1)
            if mine:
                for chunk in _chunks(frames[~torch.isin(frames, kf)], self.chunk_size):
                    out[chunk] = self.step_frames(*args, chunk, kf, Phase.propagate, source).to(out)
                    owned[chunk] = True
            later = {int(k) for k in anchors if int(k) > last}
            runtime.keep_keyframes({int(segment[-1])} | later)  # the boundary keyframe and anchors still to come
        return self.ranks.merge(out, owned)

    def source_branch(self, inversion_prompt: str) -> Branch | None:
        """The source branch (inverted latents, inversion prompt) if the editor or the propagator needs it."""
        if not (self.editor.needs_source or self.propagator.needs_source):
            return None
        return self.editor.source_branch(Branch(SOURCE, self.model.encode_text(inversion_prompt), latents=Latents.source,
                                                joint=False))

    # ---- the whole edit --------------------------------------------------------------------------
    def edit(self, inversion: InversionResult, prompt: str, negative_prompt: str = "", inversion_prompt: str | None = None,
             progress: bool = True, on_match: CorrespondenceCallback | None = None,
             video: Video | None = None, output: FrameSink | Sequence[FrameSink] = (),
             keep_frames: bool = True, on_schedule: Callable[[list[list[int]]], None] | None = None,
             callback_on_step_end: StepCallback | None = None,
             callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> EditResult:
        """Edit from an existing inversion; returns decoded frames and what was done.

        ``video``: the input frames, for propagators that read pixels (optical flow); optional.
        ``output``: sinks (e.g. a ``VideoWriter`` and a ``FrameWriter``) given the frames as they are decoded,
        ``model.vae_batch`` at a time; with ``keep_frames=False`` the frames are not gathered (``frames`` is
        None) and decoding needs memory for one batch only, whatever the video's length.
        ``on_schedule``: called with the keyframes of every step once they are drawn, before the first step (e.g.
        to check memory again after an adaptive cut; it may raise to stop the run).
        ``callback_on_step_end``: as in diffusers' pipelines, ``callback(pipe, i, t, callback_kwargs) -> dict`` after
        every step ``i`` (timestep ``t``), given the tensors named in ``callback_on_step_end_tensor_inputs`` (of
        :attr:`callback_tensor_inputs`: ``latents`` (N, C, h, w) float32 after the step, ``keyframes`` (K,) the step's
        keyframe indices); a ``latents`` it returns replaces the edit's (same shape).
        """
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self.callback_tensor_inputs]
        if unknown:
            raise ConfigError(f"callback_on_step_end_tensor_inputs={list(callback_on_step_end_tensor_inputs)}: "
                              f"{unknown[0]!r} is not one of {list(self.callback_tensor_inputs)}")
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
                    if callback_on_step_end is not None:
                        x = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, i,
                                                timesteps[i], x, schedule[i])
            self.propagator.finish()
        finally:
            runtime.remove()
        t_edit = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames = decode_frames(self.model, x, [output] if hasattr(output, "write") else list(output), keep_frames)
        timings = {"editing_s": t_edit, "decoding_s": time.perf_counter() - t0}
        return EditResult(frames, x.cpu(), schedule, timesteps, timings, self.unet_evaluations)

    def _step_callback(self, callback: StepCallback, names: Sequence[str], i: int, t: int, x: Tensor,
                       keyframes: list[int]) -> Tensor:
        """Run a step-end callback on the named tensors; its ``latents``, if any, replace the edit's."""
        available = {"latents": lambda: x, "keyframes": lambda: torch.tensor(keyframes, dtype=torch.long)}
        returned = callback(self, i, int(t), {name: available[name]() for name in names}) or {}
        if "latents" not in returned or returned["latents"] is x:
            return x
        new = returned["latents"]
        if not isinstance(new, Tensor) or tuple(new.shape) != tuple(x.shape):
            raise ConfigError(f"callback_on_step_end returned latents of shape "
                              f"{tuple(getattr(new, 'shape', ()))} at step {i}; the edit's are {tuple(x.shape)}")
        return new.to(x.device, x.dtype)

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
                 on_schedule: Callable[[list[list[int]]], None] | None = None,
                 callback_on_step_end: StepCallback | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> EditResult:
        """Invert ``video`` (cached; the trajectory on disk) and edit it towards ``prompt`` (``output``,
        ``keep_frames``, ``on_schedule``, ``callback_on_step_end``: see :meth:`edit`)."""
        check_pairing(self.editor, self.model, self.sampler)  # before the inversion: a model the editor
        self.editor.check(self.model)  # cannot drive fails at once
        t0 = time.perf_counter()
        if self.editor.needs_inversion:  # with several processes: split by frame chunks (see invert_video)
            inversion, hit, inverted = invert_or_load(self.model, video, self.inverter, inversion_prompt, self.cache, progress,
                                               None, self.ranks)
        else:  # inversion-free (FlowEdit): the encoded frames only, no trajectory on disk
            inversion, hit, inverted = InversionResult.clean_only(encode_video(self.model, video), inversion_prompt), False, 0
        t_inv = time.perf_counter() - t0
        result = self.edit(inversion, prompt, negative_prompt, inversion_prompt, progress, on_match, video=video,
                           output=output, keep_frames=keep_frames, on_schedule=on_schedule,
                           callback_on_step_end=callback_on_step_end,
                           callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
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
