"""TokenFlow editing on the tiny model: the method's defining properties, checked exactly where possible."""
from __future__ import annotations

import pytest
import torch

from conftest import translation_clip
from tokenflow.editors import PnPEditor
from tokenflow import (DDIMInverter, FixedKeyframes, NoPropagation, RandomKeyframes, TokenFlowPipeline,
                       TokenFlowPropagator, invert_video, reconstruct)
from tokenflow.core.attention import TokenFlowRuntime
from tokenflow.core.editor import EditInputs
from tokenflow.models.ddim import ddim_timesteps
from tokenflow.models.layout import UNetLayout
from tokenflow.core.propagation import paper_blend, reference_blend

STEPS, N_FRAMES = 4, 5  # the same synthetic inversion as tests/test_core_oracles.py (memoised per session)


def _inversion(model, video, prompt="a wolf", steps=STEPS):
    return invert_video(model, video, DDIMInverter(n_steps=steps, keep_steps=steps), prompt, progress=False)[0]


def _distances_to_reconstruction(model, inversion, keyframes):
    """Relative L2 distance of the edited latents to the DDIM reconstruction: TokenFlow with the inversion prompt at
    guidance 1, and a real edit (another prompt, guidance 7.5, per frame) of the same inversion."""
    recon = reconstruct(model, inversion, progress=False)
    pipe = TokenFlowPipeline(model, PnPEditor(guidance_scale=1.0), TokenFlowPropagator(), keyframes, n_steps=STEPS)
    edited = pipe.edit(inversion, prompt=inversion.prompt, negative_prompt="", progress=False).latents
    other = TokenFlowPipeline(model, PnPEditor(guidance_scale=7.5), NoPropagation(), n_steps=STEPS).edit(
        inversion, prompt="a red car on a beach", negative_prompt="", progress=False).latents
    return float((edited - recon).norm() / recon.norm()), float((other - recon).norm() / recon.norm())


def test_same_prompt_guidance_one_stays_close_to_reconstruction(tiny, synthetic_inversion):
    """With the inversion prompt at guidance 1 the edit is (nearly) the DDIM reconstruction: extended attention
    and propagation only reshuffle matching tokens. Catches propagation that gathers the wrong tokens or keyframes,
    broken blend weights, latents started off the inverted trajectory.
    """
    _, inversion = synthetic_inversion(N_FRAMES, STEPS)
    dist, dist_other = _distances_to_reconstruction(tiny, inversion, RandomKeyframes(2, seed=0))
    # measured on the 5-frame 64x64 translation clip, 4 steps: 0.0029 vs 0.179 for the real edit (on 8 real wolf
    # frames at 128x128, the old needs_data variant of this test: 0.0011 vs 0.180, so the synthetic clip is the
    # harder case and the real-clip run was dropped)
    assert dist < 0.01, dist
    assert dist < dist_other / 10, (dist, dist_other)


class RecomputeKeyframes(TokenFlowPropagator):
    """Keyframes go through the chunk pass again, so they are propagated (to themselves) like any frame."""

    @property
    def reuses_keyframe_pass(self) -> bool:
        return False


@pytest.fixture(scope="module")
def joint_edit(tiny, synthetic_inversion):
    """Latents of editing every frame jointly (one keyframe pass over all frames per step), by hand."""
    _, inversion = synthetic_inversion(N_FRAMES, STEPS)
    joint = TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), n_steps=STEPS)
    timesteps = ddim_timesteps(tiny.scheduler, STEPS)
    joint.editor.prepare(EditInputs(tiny, inversion, "a robotic wolf", "ugly", "a wolf", timesteps))
    source = joint.source_branch("a wolf")
    x = inversion.at(timesteps[0]).clone()
    everything = torch.arange(N_FRAMES)
    with torch.no_grad(), TokenFlowRuntime(joint.editor, joint.propagator).install(tiny.unet, joint.layout) as rt:
        for i in range(STEPS):
            x = joint.step_frames(rt, x, inversion, i, timesteps, everything, everything, "keyframes", source).cpu()
    return x


@pytest.mark.parametrize("propagator", [TokenFlowPropagator(blend="paper"), RecomputeKeyframes(blend="paper")],
                         ids=["reuse", "recompute"])
def test_stride_one_propagation_equals_joint_extended_attention(tiny, synthetic_inversion, joint_edit, propagator):
    """Every frame a keyframe: the pipeline must reproduce joint editing of all frames. With ``recompute`` every
    frame is also propagated (in chunks of 3 of 5 frames) from the keyframe pass, to itself. Catches a keyframe pass
    that is not joint, propagation that does not map a keyframe's tokens to themselves, chunking errors.
    """
    _, inversion = synthetic_inversion(N_FRAMES, STEPS)
    tokenflow = TokenFlowPipeline(tiny, PnPEditor(), propagator, RandomKeyframes(1), n_steps=STEPS, chunk_size=3)
    result = tokenflow.edit(inversion, "a robotic wolf", "ugly", progress=False)
    # reuse: the keyframe pass only (3N per step); recompute: keyframe pass + chunks (6N)
    assert result.unet_evaluations == STEPS * 3 * N_FRAMES * (2 if isinstance(propagator, RecomputeKeyframes) else 1)
    diff = float((result.latents - joint_edit).abs().max())
    if propagator.reuses_keyframe_pass:  # the very same UNet calls as the joint loop
        assert diff == 0, diff
    else:  # measured 2.4e-6 (latents up to 5.2): the chunk passes batch 9 and 6 samples instead of 15, and CPU
        # kernels then sum in another order (one UNet call: 8e-8); one token per frame and layer taken from a
        # wrong neighbour moves the latents by 7.9e-3 (measured)
        assert diff < 1e-4, diff


def test_nearest_neighbour_field_recovers_translation(tiny):
    """Frames are circular shifts by 8 px = 1 token at the first layer: interior tokens must map back."""
    shift_tokens, size = 1, 128
    video = translation_clip(n=3, size=size, shift=8 * shift_tokens)
    steps = 2  # correspondences are read at the first step only
    inversion = _inversion(tiny, video, prompt="", steps=steps)
    layer = UNetLayout.from_unet(tiny.unet).self_attention[0]
    fields = {}

    def record(name, frames, keyframe, index, similarity):
        if name == layer and (int(frames[0]), keyframe) not in fields:
            for r, f in enumerate(frames.tolist()):
                fields[(f, keyframe)] = index[r].clone()

    pipe = TokenFlowPipeline(tiny, PnPEditor(pnp_attn_t=0.0, pnp_f_t=0.0), TokenFlowPropagator(), FixedKeyframes([0]),
                             n_steps=steps)
    pipe.edit(inversion, "", "", progress=False, on_match=record)
    side = size // 8
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    for frame in (1, 2):
        # interior: the token and its source in the keyframe are both >= 3 tokens from the zero-padded borders
        interior = (xs - frame * shift_tokens >= 3) & (xs < side - 3) & (ys >= 3) & (ys < side - 3)
        expected = ys * side + (xs - frame * shift_tokens) % side  # frame f at x came from keyframe 0 at x - f
        got = fields[(frame, 0)].reshape(side, side)
        accuracy = (got == expected)[interior].float().mean().item()
        assert accuracy > 0.95, (frame, accuracy)  # measured 1.0 (frame 1), 0.975 (frame 2)


def test_reference_blend_matches_official_formula():
    """Worked example, stride 8: frame s in chunk i blends kf_i (w1) and kf_{i-1} (1 - w1)."""
    frames = torch.tensor([0, 3, 7, 8, 11, 12, 15, 20])
    keyframes = torch.tensor([2, 13, 17])
    positions, weights = reference_blend(frames, keyframes, stride=8)
    sig = lambda v: 1 / (1 + torch.exp(torch.tensor(-v)))
    # s=8: chunk 1, p1=12, p2=4, d1=4, d2=4 -> sigmoid(0.5); s=11: d1=1, d2=7 -> sigmoid(7/8)
    # s=15: d1=3, d2=11 -> sigmoid(11/14); s=20: chunk 2, p1=20, p2=12, d1=0, d2=8 -> sigmoid(1)
    expected_w1 = [1, 1, 1, sig(0.5), sig(7 / 8), sig(1.0), sig(11 / 14), sig(1.0)]
    assert torch.allclose(weights[:, 0], torch.tensor([float(w) for w in expected_w1]), atol=1e-6)
    assert torch.allclose(weights.sum(1), torch.ones(len(frames)))
    assert positions[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert positions[3:, 1].tolist() == [0, 0, 0, 0, 1]
    assert 0.62 < weights[3:, 0].min() and weights[3:, 0].max() < 0.732  # the sigmoid's narrow range


def test_paper_blend_is_linear_between_surrounding_keyframes():
    frames = torch.arange(0, 12)
    positions, weights = paper_blend(frames, torch.tensor([2, 6, 10]))
    assert positions[4].tolist() == [0, 1] and torch.allclose(weights[4], torch.tensor([0.5, 0.5]))
    assert positions[3].tolist() == [0, 1] and torch.allclose(weights[3], torch.tensor([0.75, 0.25]))
    assert torch.allclose(weights[6], torch.tensor([1.0, 0.0]))               # a keyframe takes itself
    assert weights[0, 1] == 1 and positions[0, 1] == 0                           # before the first keyframe
    assert weights[11, 0] == 1 and positions[11, 0] == 2                         # after the last keyframe


def test_processors_removed_leave_unet_bit_identical(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    emb = torch.randn(2, 77, tiny.unet.config.cross_attention_dim, generator=g)
    unet = tiny.unet
    before = dict(unet.attn_processors)
    with torch.no_grad():
        reference = unet(x, 501, encoder_hidden_states=emb).sample
        pipe = TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), n_steps=2)
        rt = TokenFlowRuntime(pipe.editor, pipe.propagator).install(unet, pipe.layout)
        hooked = unet(x, 501, encoder_hidden_states=emb).sample  # outside a run the processors act plainly
        rt.remove()
        after = unet(x, 501, encoder_hidden_states=emb).sample
    assert torch.equal(reference, after)
    assert torch.allclose(reference, hooked, atol=1e-5)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert not any(m._forward_hooks for m in unet.modules())


def test_random_keyframes_one_per_chunk_and_seeded():
    seq = RandomKeyframes(stride=8, seed=3).sequence(20, 21)
    assert seq == RandomKeyframes(stride=8, seed=3).sequence(20, 21)
    for kf in seq:
        assert [k // 8 for k in kf] == [0, 1, 2] and all(k < 21 for k in kf)
    assert len({tuple(k) for k in seq}) > 1  # redrawn every step


def test_reference_keyframe_draw_equals_official_formula():
    seed, stride, n = 1, 8, 40
    torch.manual_seed(seed)  # the official code: seed_everything(seed), then one randint per step
    official = [(torch.randint(stride, (n // stride,)) + torch.arange(0, n, stride)).tolist() for _ in range(50)]
    assert RandomKeyframes(stride, seed, formula="reference").sequence(50, n) == official
