"""AdaFlow's adaptive keyframes: clip cuts on features with known answers, AdaFlow's loop written out as published
(quirks included) as the oracle for ``formula=reference``, the feature pass against a hook on a full forward,
and adaptive keyframes through the pipeline and the CLI."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import translation_clip
from tokenflow import AdaptiveKeyframes, DDIMInverter, TokenFlowPipeline, TokenFlowPropagator, invert_video
from tokenflow.core.clips import adaptive_clips, default_feature_layer, frame_features, similar_enough
from tokenflow.editors import PnPEditor
from tokenflow.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def scenes(lengths: list[int], hw: int = 8, c: int = 16, seed: int = 0) -> torch.Tensor:
    """Features (N, hw, hw, C) of a video made of scenes: within a scene every frame is the scene's token map with
    a little noise (best-match cosine ~0.99); scenes are unrelated random maps (cosine ~0.3)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        base = torch.randn(hw, hw, c, generator=g)
        out += [base + 0.05 * torch.randn(hw, hw, c, generator=g) for _ in range(n)]
    return torch.stack(out)


# ---- AdaFlow's loop, transcribed as published (run.py, prepare_dift_matching / check_similarity) ------------

def adaflow_check(sim, region, stride, mean_threshold=0.75, region_threshold=0.6):
    if torch.mean(sim) < mean_threshold:
        return False
    for i in range(0, sim.shape[0] - region + 1, stride):
        for j in range(0, sim.shape[1] - region + 1, stride):
            if torch.mean(sim[i:i + region, j:j + region]) < region_threshold:
                return False
    return True


def adaflow_cuts(frames_ft, max_batch_size=400):
    batch_begin_idx = [0]
    dim = frames_ft.shape[-1]
    cur_frame_idx = 0
    h, w = frames_ft[0].shape[:2]
    while cur_frame_idx < len(frames_ft):
        ft1 = frames_ft[cur_frame_idx].reshape(-1, dim)
        ft1 = ft1 / ft1.norm(dim=-1, keepdim=True)
        for frame_idx in range(cur_frame_idx + 1, len(frames_ft)):
            ft2 = frames_ft[frame_idx].reshape(-1, dim)
            ft2 = ft2 / ft2.norm(dim=-1, keepdim=True)
            max_sim = (ft1 @ ft2.T).max(dim=1).values.reshape(h, w)
            if not adaflow_check(max_sim, max(h, w) // 16, max(h, w) // 32) or \
                    frame_idx - cur_frame_idx >= max_batch_size - 1:
                batch_begin_idx.append(frame_idx)
                cur_frame_idx = frame_idx + 1
                if cur_frame_idx == len(frames_ft) - 1:
                    cur_frame_idx += 1
                break
            if frame_idx == len(frames_ft) - 1:
                cur_frame_idx = frame_idx + 1
    return batch_begin_idx


def test_scene_cuts_are_found():
    features = scenes([5, 7, 4])
    assert adaptive_clips(features) == [0, 5, 12]
    assert adaptive_clips(features, max_clip=3) == [0, 3, 5, 8, 11, 12, 15]  # long scenes split every 3 frames
    assert adaptive_clips(scenes([9])) == [0]                                # one scene: one clip


@pytest.mark.parametrize("lengths, max_clip", [([5, 7, 4], 400), ([1, 6, 2, 5], 400), ([12, 3], 4), ([2, 2, 2, 2], 400)])
def test_reference_formula_is_adaflows_loop(lengths, max_clip):
    """At 64x64 tokens (AdaFlow's 512² DIFT size: windows of 4 stepped by 2) and with AdaFlow's quirks: after a cut at
    c the next clip is compared against frame c + 1, and a clip may swallow a scene's first frame."""
    features = scenes(lengths, hw=64, c=8)
    assert adaptive_clips(features, max_clip=max_clip, formula="reference") == adaflow_cuts(features, max_clip)


def test_a_local_change_cuts_through_the_windows():
    """A frame equal to the reference except one 4x4 corner: the mean stays high, a window drops (64 channels: a
    replaced token finds no good match elsewhere)."""
    features = scenes([6], hw=64, c=64)
    changed = features.clone()
    changed[3:, :4, :4] = torch.randn(4, 4, 64, generator=torch.Generator().manual_seed(9))
    best = torch.nn.functional.normalize(changed[0].reshape(-1, 64), dim=-1) @ \
        torch.nn.functional.normalize(changed[3].reshape(-1, 64), dim=-1).T
    best = best.amax(1).reshape(64, 64)
    assert float(best.mean()) > 0.75 and not similar_enough(best, 0.75, 0.6)
    assert adaptive_clips(changed) == [0, 3]
    assert adaflow_cuts(changed) == adaptive_clips(changed, formula="reference")


def test_one_keyframe_per_clip_drawn_like_adaflow():
    features = scenes([5, 7, 4])
    schedule = AdaptiveKeyframes(seed=1).sequence(3, 16, features=features)
    rng = random.Random(1)  # AdaFlow: random.randint(begin, next_begin - 1) clip by clip, step by step
    assert schedule == [[rng.randint(0, 4), rng.randint(5, 11), rng.randint(12, 15)] for _ in range(3)]
    assert len({tuple(s) for s in schedule}) > 1  # redrawn every step
    with pytest.raises(ConfigError, match="features="):
        AdaptiveKeyframes().sequence(3, 16)
    with pytest.raises(ConfigError, match="mean_threshold=1.5"):
        AdaptiveKeyframes(mean_threshold=1.5)


def test_feature_pass_reads_the_layer_input_of_a_full_forward(tiny):
    """frame_features stops at the layer; its tokens equal those a hook sees in a complete forward pass."""
    layout = tiny.layout()
    layer = default_feature_layer(layout)
    assert layout.stage[layer] == "up" and layout.level[layer] == 0
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    text = tiny.encode_text("a wolf")
    got = frame_features(tiny, latents, 1, text, layer, batch=2)
    seen = []
    handle = tiny.unet.get_submodule(layer).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            tiny.predict(latents, 1, text.rows(torch.arange(3)))
    finally:
        handle.remove()
    assert got.shape == (3, 8, 8, seen[0].shape[-1])
    assert torch.allclose(got.reshape(3, 64, -1), seen[0].float(), atol=1e-5)  # batches of 2 vs 3: float order
    with pytest.raises(ConfigError, match="keyframes.layer='nope'"):
        frame_features(tiny, latents, 1, text, "nope")


def test_pipeline_edits_with_adaptive_keyframes(tiny):
    """Two scenes of a translating texture: the pipeline cuts them apart and draws one keyframe in each."""
    a, b = translation_clip(n=5, size=64, shift=4, seed=0), translation_clip(n=5, size=64, shift=4, seed=1)
    from tokenflow import Video
    video = Video(frames=__import__("numpy").concatenate([a.frames, b.frames]), fps=10.0)
    inversion, _ = invert_video(tiny, video, DDIMInverter(n_steps=2, keep_steps=2), "a texture", progress=False)
    schedule = AdaptiveKeyframes(seed=0, mean_threshold=0.9, region_threshold=0.8)
    pipe = TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), schedule, n_steps=2, chunk_size=4)
    result = pipe.edit(inversion, "a red texture", "", "a texture", progress=False)
    assert all(len(k) >= 2 for k in result.keyframes)
    assert any(k < 5 for k in result.keyframes[0]) and any(k >= 5 for k in result.keyframes[0])
    assert torch.isfinite(result.latents).all()


def test_auto_is_the_papers_draw_up_to_max_keyframes_then_adaptive():
    from tokenflow import RandomKeyframes
    from tokenflow.core.keyframes import AutoKeyframes

    auto = AutoKeyframes(stride=8, seed=3, max_keyframes=20)
    assert not auto.reads_features(160) and auto.sequence(4, 160) == RandomKeyframes(8, seed=3).sequence(4, 160)
    assert auto.bound(4, 160) == 20
    assert auto.reads_features(161)
    features = scenes([100, 61])
    assert auto.sequence(2, 161, features=features) == AdaptiveKeyframes(seed=3).sequence(2, 161, features=features)
    assert [len(k) for k in auto.sequence(2, 161, features=features)] == [2, 2]  # two scenes, one keyframe each
    with pytest.raises(ConfigError, match="features="):
        auto.sequence(2, 161)


def test_dift_features_are_the_decoder_block_output_averaged_over_noise(tiny):
    """features=dift: up_blocks[2]'s output for the latents noised to t (DDIM add_noise), empty prompt, the mean
    over the ensemble — written out with a hook on complete forward passes and the same seeded draws."""
    from tokenflow.core.clips import dift_features

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    got = dift_features(tiny, latents, up_block=2, t=10, ensemble=3, seed=5, batch=2)
    alpha = float(tiny.scheduler.alphas_cumprod[10])
    draws = torch.Generator().manual_seed(5)
    text = tiny.encode_text("")
    want = []
    for frames in (torch.arange(0, 2), torch.arange(2, 3)):
        outs = []
        handle = tiny.unet.up_blocks[2].register_forward_hook(lambda m, a, o: outs.append(o))
        try:
            with torch.no_grad():
                for _ in range(3):
                    noise = torch.randn(latents[frames].shape, generator=draws)
                    tiny.predict(alpha ** 0.5 * latents[frames] + (1 - alpha) ** 0.5 * noise, 10,
                                 text.rows(torch.arange(len(frames))))
        finally:
            handle.remove()
        want.append(torch.stack(outs).mean(0).permute(0, 2, 3, 1))
    want = torch.cat(want)
    assert got.shape == want.shape and got.shape[1:3] == (8, 8)  # block 2's output: latent resolution (SD)
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ConfigError, match="dift_block=7"):
        dift_features(tiny, latents, up_block=7)


def test_adaptive_keyframes_on_dift_features_through_the_pipeline(tiny):
    video_a, video_b = translation_clip(n=4, size=64, shift=4, seed=0), translation_clip(n=4, size=64, shift=4, seed=1)
    from tokenflow import Video
    video = Video(frames=__import__("numpy").concatenate([video_a.frames, video_b.frames]), fps=10.0)
    inversion, _ = invert_video(tiny, video, DDIMInverter(n_steps=2, keep_steps=2), "a texture", progress=False)
    schedule = AdaptiveKeyframes(seed=0, features="dift", dift_ensemble=2, mean_threshold=0.9, region_threshold=0.8)
    pipe = TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), schedule, n_steps=2, chunk_size=4)
    result = pipe.edit(inversion, "a red texture", "", "a texture", progress=False)
    assert all(1 <= len(k) for k in result.keyframes) and torch.isfinite(result.latents).all()
    with pytest.raises(ConfigError, match="keyframes.features='sift'"):
        AdaptiveKeyframes(features="sift")
