"""AdaFlow's propagation, its attention slimming and its DIFT encoding, each against AdaFlow's code written out as
published (run.py ``get_matching`` / ``key_matching``, adaflow_utils.py's gather, dift_sd.py's SDFeaturizer) or
against diffusers' own pieces; and the three together through the pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import translation_clip
from tokenflow import (AdaptiveKeyframes, DDIMInverter, FixedKeyframes, KeyframeAttention, TokenFlowPipeline,
                       TokenFlowPropagator, Video, invert_video)
from tokenflow.core.attention import TokenFlowRuntime
from tokenflow.core.clip_propagation import ClipPropagator
from tokenflow.core.clips import dift_features, features_at
from tokenflow.core.propagation import PropagationInputs, PropagationQuery
from tokenflow.editors import PnPEditor
from tokenflow.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# ---- AdaFlow, transcribed (run.py prepare_dift_matching / get_matching, adaflow_utils.py AdaFlowBlock) ---------------
def adaflow_resized(ft_list: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """frames_ft = interpolate(cat(ft_list), (h, w), bilinear) .permute(0, 2, 3, 1): (N, h, w, C)."""
    return torch.nn.functional.interpolate(ft_list, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def adaflow_get_matching(frames_ft: torch.Tensor, begin_idx: int, batch_size: int, is_key: bool = False) -> torch.Tensor:
    """``get_matching``'s small-batch branch: row j of the result, for every token of the batch, its argmax (or max
    similarity, ``is_key``) over frame j's tokens."""
    dim = frames_ft.shape[-1]
    batch_ft = frames_ft[begin_idx:begin_idx + batch_size].reshape(-1, dim)
    batch_ft = batch_ft / batch_ft.norm(dim=-1, keepdim=True)
    similarity = batch_ft @ batch_ft.T
    idx = []
    for sim in similarity.chunk(batch_size, dim=1):
        idx.append((sim.max(dim=1).values if is_key else sim.argmax(dim=1)).unsqueeze(0))
    return torch.cat(idx)


def adaflow_propagate(attn_output: torch.Tensor, matching: torch.Tensor, pivotal: int, start: int, idx_begin: int,
                      idx_end: int, seq: int) -> torch.Tensor:
    """The non-pivotal pass of ``AdaFlowBlock``: attn_output (3, 1, S, D) of the clip's pivotal frame, gathered
    at ``matching[pivotal - batch_start_idx]`` for the frames idx_begin:idx_end of the clip → (3 · F, S, D)."""
    m = matching[pivotal - start].view(-1, seq)[idx_begin:idx_end].reshape(-1)
    idx1 = torch.stack([m] * 3, dim=0)
    dim = attn_output.shape[-1]
    out = attn_output[:, 0].gather(dim=1, index=idx1.unsqueeze(-1).repeat(1, 1, dim))
    return out.reshape(-1, seq, dim)


def _prepared(features: torch.Tensor, clips: list[int], keyframes: list[list[int]]) -> ClipPropagator:
    prop = ClipPropagator()
    prop.prepare(PropagationInputs(model=None, inversion=None, timesteps=list(range(len(keyframes))),
                                   keyframes=keyframes, latent_hw=tuple(features.shape[1:3]), features=features,
                                   clips=clips))
    return prop


def test_features_at_is_adaflows_resize():
    ft = torch.randn(5, 16, 12, 7)  # (N, h, w, C): DIFT at the latents' size
    for h, w in [(16, 12), (8, 6), (4, 3), (2, 2)]:
        want = adaflow_resized(ft.permute(0, 3, 1, 2), h, w)[torch.tensor([3, 1])]
        assert torch.allclose(features_at(ft, torch.tensor([3, 1]), (h, w)), want.reshape(2, h * w, -1), atol=1e-6)


def test_each_frame_takes_its_clips_keyframe_along_adaflows_matching():
    g = torch.Generator().manual_seed(0)
    n, (h0, w0), c = 11, (8, 8), 6
    ft = torch.randn(n, h0, w0, c, generator=g)
    clips, pivotal = [0, 4, 9], [2, 4, 10]  # one keyframe per clip; clip 1 starts at its keyframe
    prop = _prepared(ft, clips, [pivotal])
    ends = clips[1:] + [n]
    for h, w in [(8, 8), (4, 4)]:
        frames_ft = adaflow_resized(ft.permute(0, 3, 1, 2), h, w)
        outputs = torch.randn(3, len(pivotal), h * w, 5, generator=g)  # (branches, K, S, D): the keyframe pass
        frames = torch.tensor([0, 1, 3, 5, 6, 7, 8, 9])
        got = prop.propagate(PropagationQuery("l", (h, w), 0, frames, torch.tensor(pivotal), outputs))
        for c_, (a, b) in enumerate(zip(clips, ends)):
            matching = adaflow_get_matching(frames_ft, a, b - a)
            want = adaflow_propagate(outputs[:, c_:c_ + 1], matching, pivotal[c_], a, 0, b - a, h * w)
            want = want.view(3, b - a, h * w, -1)
            for i, f in enumerate(frames.tolist()):
                if a <= f < b:
                    assert torch.equal(got[:, i], want[:, f - a]), (h, f)


def test_clip_propagator_needs_adaptive_clips_with_one_keyframe_each():
    prop = ClipPropagator()
    with pytest.raises(ConfigError, match="keyframes=adaptive"):
        prop.prepare(PropagationInputs(None, None, [0], [[0]], (4, 4)))
    with pytest.raises(ConfigError, match="one keyframe per clip"):
        _prepared(torch.randn(6, 4, 4, 3), [0, 3], [[0, 4], [1, 2]])
    assert not prop.needs_source and prop.source_features == "propagated" and prop.reuses_keyframe_pass
    with pytest.raises(ConfigError, match="source_features"):
        ClipPropagator(source_features="dirty")


def test_reference_slimming_is_adaflows_key_matching():
    """attention.slimming=reference: per keyframe the top int(K·S // (K / max_kv)) pooled tokens by max-similarity
    of the resized video features (AdaFlow's key_matching), once per step and grid."""
    g = torch.Generator().manual_seed(1)
    n, c, max_kv = 9, 5, 2
    ft = torch.randn(n, 8, 8, c, generator=g)
    runtime = TokenFlowRuntime(editor=None, propagator=None, latent_hw=(8, 8), max_kv_frames=max_kv, slim_features=ft)
    keyframes = torch.tensor([1, 4, 7])
    for h, w in [(8, 8), (4, 4)]:
        tokens = torch.randn(3, h * w, 4, generator=g)  # the source tokens: not read by the reference scores
        got = runtime.slimming(keyframes, (h, w), tokens)
        key_ft = adaflow_resized(ft.permute(0, 3, 1, 2), h, w)[keyframes]
        key_match = adaflow_get_matching(key_ft, 0, len(key_ft), is_key=True)
        k = int(key_match.shape[1] // (key_match.shape[0] / max_kv))
        want = torch.topk(key_match, k, dim=1, largest=True).indices
        assert got.shape == want.shape == (3, 2 * h * w)
        assert torch.equal(got, want.sort(dim=1).values)
        assert runtime.slimming(keyframes, (h, w), tokens) is got  # scored once per step and grid
    runtime.clear_step()
    assert runtime.slimming(keyframes[:2], (4, 4), torch.randn(2, 16, 4)) is None  # at most max_kv keyframes: full


def test_reference_dift_is_sdfeaturizer(tiny):
    """dift_encode=reference: SDFeaturizer's own steps — the frame in [0, 1] (no 2x - 1) repeated over the ensemble into
    the VAE, ``latent_dist.sample()``, ``randn_like`` noise (its draws follow the VAE output's memory layout),
    diffusers' ``add_noise`` at t, decoder block 2's output averaged — on the global RNG seeded as AdaFlow's
    ``seed_everything`` does (the CPU generator the library seeds draws the same sequence)."""
    from diffusers import DDIMScheduler

    g = np.random.default_rng(0)
    frames = g.integers(0, 256, size=(2, 32, 48, 3), dtype=np.uint8)
    got = dift_features(tiny, None, up_block=2, t=3, ensemble=2, seed=7, encode="reference", frames=frames)
    scheduler = DDIMScheduler.from_config(tiny.scheduler.config)
    text = tiny.encode_text("").hidden
    want = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for frame in frames:
            img = torch.from_numpy(frame).permute(2, 0, 1).float().div(255).repeat(2, 1, 1, 1)
            outs = []
            handle = tiny.unet.up_blocks[2].register_forward_hook(lambda m, a, o: outs.append(o))
            try:
                with torch.no_grad():
                    latents = tiny.vae.encode(img).latent_dist.sample() * tiny.vae.config.scaling_factor
                    noise = torch.randn_like(latents)
                    noisy = scheduler.add_noise(latents, noise, torch.tensor(3))
                    tiny.unet(noisy, torch.tensor(3), encoder_hidden_states=text.repeat(2, 1, 1))
            finally:
                handle.remove()
            want.append(outs[0].mean(0, keepdim=True).permute(0, 2, 3, 1))
    want = torch.cat(want)
    assert got.shape == want.shape == (2, 4, 6, want.shape[-1])
    assert torch.allclose(got, want, atol=1e-5)
    mean_encoded = dift_features(tiny, tiny.encode_images(torch.from_numpy(frames).permute(0, 3, 1, 2) / 127.5 - 1),
                                 up_block=2, t=3, ensemble=2, seed=7)
    assert not torch.allclose(mean_encoded, want, atol=1e-3)  # the default encoding is a different recipe
    with pytest.raises(ConfigError, match="input frames"):
        dift_features(tiny, torch.zeros(1, 4, 4, 4), encode="reference")


def test_adaflow_recipe_through_the_pipeline(tiny):
    """Adaptive keyframes on reference DIFT, AdaFlow's propagation and its slimming together: one keyframe per clip
    each step, more clips than max_kv_frames (so the keyframe pass is slimmed), keyframes reused (no recompute)."""
    clips = [translation_clip(n=3, size=64, shift=4, seed=s) for s in range(4)]
    video = Video(frames=np.concatenate([v.frames for v in clips]), fps=10.0)
    inversion, _ = invert_video(tiny, video, DDIMInverter(n_steps=2, keep_steps=2), "a texture", progress=False)
    schedule = AdaptiveKeyframes(seed=1, features="dift", dift_encode="reference", dift_ensemble=2, formula="reference",
                                 mean_threshold=0.95, region_threshold=0.9)
    attention = KeyframeAttention(max_kv_frames=2, slimming="reference")
    pipe = TokenFlowPipeline(tiny, PnPEditor(), ClipPropagator(), schedule, n_steps=2, chunk_size=4, attention=attention)
    result = pipe.edit(inversion, "a red texture", "", "a texture", progress=False, video=video)
    starts = schedule.clips(schedule.frame_features(tiny, inversion.clean, 1, "a texture", frames=video.frames))
    assert len(starts) > 2
    for keyframes in result.keyframes:
        assert len(keyframes) == len(starts)
        assert (np.searchsorted(starts, keyframes, side="right") - 1).tolist() == list(range(len(starts)))
    assert result.unet_evaluations == 2 * 3 * 12  # keyframes once (reused), the others in the chunk pass
    assert torch.isfinite(result.latents).all()
    with pytest.raises(ConfigError, match="slimming=reference"):
        TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), FixedKeyframes([0]), n_steps=2,
                          attention=KeyframeAttention(slimming="reference")).edit(inversion, "x", progress=False)


# ---- AdaFlow's own code, run on the same tiny weights -----------------------------------------------------------------
GOLDEN = Path(__file__).resolve().parent / "data" / "adaflow-d20a2c6-tiny"


def golden_frames() -> np.ndarray:
    """(9, 64, 256, 3) uint8: three unrelated translating textures of three frames each (non-square: AdaFlow resizes
    square frames to 512x512)."""
    return np.concatenate([translation_clip(n=3, size=256, shift=8, seed=s).frames[:, :64] for s in range(3)])


def test_reference_adaflow_reproduces_adaflows_code(tiny):
    """experiment=reference_adaflow against AdaFlow's own run.py (d20a2c6, CPU/fp32, diffusers 0.29.2) on the same
    tiny weights and frames, recorded in tests/data (how: docs/reference.md): the same clips and pivotal draws, the
    edited latents within 5e-4 (measured 7e-5) and the frames within 1/255 after the same truncation. Five clips
    against max_kv_size 2, so the keyframe pass is slimmed and clips span chunk passes."""
    from hydra import compose, initialize_config_module
    import tokenflow.cli.config  # noqa: F401
    from tokenflow.instantiation import build
    from tokenflow.models.tiny import TinyModelSpec

    meta = json.loads(GOLDEN.with_suffix(".json").read_text())
    assert TinyModelSpec().key() == meta["tiny_model_key"], "the tiny model changed: record AdaFlow's run again"
    theirs = torch.tensor(meta["final_latents"], dtype=torch.float32).reshape(meta["final_latents_shape"])
    s = meta["settings"]
    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        cfg = compose(config_name="edit", overrides=[
            "experiment=reference_adaflow", "video=x.mp4", f"height={s['H']}", f"width={s['W']}",
            f"n_steps={s['n_timesteps']}", f"inverter.n_steps={s['n_inversion_steps']}",
            f"keyframes.mean_threshold={s['similarity_mean_threshold']}",
            f"keyframes.region_threshold={s['similarity_region_threshold']}",
            f"attention.max_kv_frames={s['max_kv_size']}", f"chunk_size={2 * s['max_kv_size']}"])
    video = Video(frames=golden_frames(), fps=10.0)
    inverter, keyframes = build(cfg.inverter), build(cfg.keyframes)
    pipe = TokenFlowPipeline(tiny, build(cfg.editor), build(cfg.propagator), keyframes, inverter, n_steps=cfg.n_steps,
                             chunk_size=cfg.chunk_size, attention=build(cfg.attention))
    inversion, _ = invert_video(tiny, video, inverter, meta["inversion_prompt"], progress=False)
    seen = []
    result = pipe.edit(inversion, s["prompt"], s["negative_prompt"], meta["inversion_prompt"], progress=False,
                       video=video, on_schedule=seen.append)
    assert result.keyframes == [meta["all_pivotal_idx"][str(t)] for t in result.timesteps] == seen[0]
    assert len(meta["batch_begin_idx"]) == len(result.keyframes[0]) > s["max_kv_size"]
    assert (result.latents - theirs).abs().max() < 5e-4
    ours, ref = ((tiny.decode_latents(x) / 2 + 0.5).clamp(0, 1).mul(255).byte().int() for x in (result.latents, theirs))
    assert (ours - ref).abs().max() <= 1
