"""Prompt-to-Prompt editor on the tiny model: exact reproduction, token logic, processors, LocalBlend."""
from __future__ import annotations

import pytest
import torch

from tokenflow.editors import PromptToPromptEditor
from tokenflow.editors.p2p_control import LocalBlend, P2PCrossAttention
from tokenflow import (ConfigError, DDIMInverter, NoPropagation, RandomKeyframes, TokenFlowPipeline,
                       TokenFlowPropagator, Video, invert_video)
from tokenflow.models.ddim import alpha_bar, ddim_step, ddim_timesteps, previous_timestep
from tokenflow.core.editor import SOURCE, Branch, EditInputs, Step
from tokenflow.models.trajectory import InversionResult, NullTextEmbeddings
from tokenflow.models.layout import UNetLayout

STEPS = 5


def _trajectory(model, x, prompt: str) -> InversionResult:
    """Plain DDIM sampling (guidance 1, default processors) from x, kept as an 'inversion' to follow."""
    timesteps = ddim_timesteps(model.scheduler, STEPS)
    cond = model.encode_text(prompt).hidden
    kept = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            kept.append(x)
            eps = model.unet(x, t, encoder_hidden_states=cond.expand(len(x), -1, -1)).sample
            x = ddim_step(x, eps, alpha_bar(model.scheduler, t), alpha_bar(model.scheduler, previous_timestep(timesteps, i)))
    return InversionResult(timesteps, torch.stack(kept), x, prompt, {"keep_steps": STEPS})


def _prepared(model, prompt: str, source: str, **config) -> PromptToPromptEditor:
    editor = PromptToPromptEditor(**config)
    inversion = InversionResult([1], torch.zeros(1, 1, 4, 8, 8), torch.zeros(1, 4, 8, 8), source, {})
    editor.prepare(EditInputs(model, inversion, prompt, "", source, [1]))
    return editor


class _ReferenceP2P:
    """Prompt-to-Prompt word swap written out (Hertz et al.), one processor for every attention layer of a UNet
    call on the batch [source, controlled, plain] (F frames each, per-frame attention): in the first
    ``cross_steps`` steps the controlled branch's cross-attention probabilities are the source's (prompts of equal
    token count: position for position); in the first ``self_steps`` steps, at the coarse self-attention layers
    (at most ``coarse`` tokens: <= 1/4 of the latent's side), its queries and keys are the source's. Values stay
    each branch's own; ``plain`` (the target prompt without control) is never touched."""

    def __init__(self, coarse: int, cross_steps: int, self_steps: int) -> None:
        self.coarse, self.cross_steps, self.self_steps, self.index = coarse, cross_steps, self_steps, 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        q, k, v = (attn.head_to_batch_dim(f(x)).unflatten(0, (3, -1))  # (branch, frames * heads, S, d)
                   for f, x in ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))
        if not cross and hidden_states.shape[1] <= self.coarse and self.index < self.self_steps:
            q[1], k[1] = q[0], k[0]
        probs = torch.stack([(q[b] @ k[b].transpose(-1, -2) * attn.scale).softmax(-1) for b in range(3)])
        if cross and self.index < self.cross_steps:
            probs[1] = probs[0]
        out = attn.batch_to_head_dim(torch.bmm(probs.flatten(0, 1), v.flatten(0, 1)))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _reference_p2p(model, source: InversionResult, source_prompt: str, target_prompt: str,
                   cross_steps: int, self_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P's source generation followed along ``source``, the controlled target and the uncontrolled target
    sampled beside it from the same noise (guidance 1) → (controlled, plain) final latents."""
    timesteps, frames, (h, w) = source.timesteps, source.clean.shape[0], source.clean.shape[-2:]
    hidden = torch.cat([model.encode_text(p).hidden.expand(frames, -1, -1)
                        for p in (source_prompt, target_prompt, target_prompt)])
    proc = _ReferenceP2P((h // 4) * (w // 4), cross_steps, self_steps)
    saved = dict(model.unet.attn_processors)
    model.unet.set_attn_processor(proc)
    x = source.latents[0].repeat(2, 1, 1, 1)
    try:
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                proc.index = i
                eps = model.unet(torch.cat([source.latents[i], x]), t, encoder_hidden_states=hidden).sample
                x = ddim_step(x, eps[frames:], alpha_bar(model.scheduler, t),
                              alpha_bar(model.scheduler, previous_timestep(timesteps, i)))
    finally:
        model.unet.set_attn_processor(saved)
    return x[:frames], x[frames:]


def test_word_swap_follows_the_source_generation_as_p2p_defines(tiny):
    """Source = a DDIM sample of 'a cat on a mat'; the word-swap edit to 'a dog on a mat' is P2P's controlled
    generation beside it (written out in the test), not plain sampling of the target prompt."""
    inversion = _trajectory(tiny, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), "a cat on a mat")
    editor = PromptToPromptEditor(mode="replace", guidance_scale=1.0, cross_replace_steps=0.8, self_replace_steps=0.4)
    out = TokenFlowPipeline(tiny, editor, NoPropagation(), n_steps=STEPS).edit(
        inversion, "a dog on a mat", "", progress=False).latents
    controlled, plain = _reference_p2p(tiny, inversion, "a cat on a mat", "a dog on a mat",
                                       cross_steps=int(STEPS * 0.8), self_steps=int(STEPS * 0.4))
    # the tiny random model's maps are near uniform, yet the control moves the result 140 times the tolerance
    # below (measured 2.8e-3): a no-op editor, which gives `plain`, fails
    assert float((controlled - plain).abs().max()) > 1e-3
    # measured 1.9e-6: explicit softmax attention in both, default SDPA processors outside the control windows
    assert torch.allclose(out, controlled, atol=2e-5, rtol=0), float((out - controlled).abs().max())


def test_word_swap_mapper_and_alpha_window(tiny):
    editor = _prepared(tiny, "a dog on a mat", "a cat on a mat", mode="replace", cross_replace_steps=0.8)
    edit = editor._edit
    assert torch.equal(edit.mapper, torch.arange(77)) and torch.all(edit.inject == 1)
    steps = [Step(i, 0, STEPS, "frames", torch.arange(1), torch.arange(0)) for i in range(STEPS)]
    assert [edit.active(s) for s in steps] == [True, True, True, True, False]  # int(5 * 0.8) = 4 steps
    base, target = torch.rand(2, 3, 6, 77).softmax(-1).unbind(0)
    assert torch.equal(edit(base, target), base)


def test_refine_aligns_tokens_new_words_keep_their_maps(tiny):
    edit = _prepared(tiny, "a fluffy cat", "a cat", mode="refine")._edit
    # <start> a fluffy cat <end> ← <start> a cat <end>; padding follows the source's padding
    assert edit.mapper[:6].tolist() == [0, 1, -1, 2, 3, 4]
    assert edit.inject[:5].tolist() == [1, 1, 0, 1, 1]
    base, target = torch.rand(2, 2, 4, 77).unbind(0)
    new = edit(base, target)
    assert torch.equal(new[..., 2], target[..., 2]) and torch.equal(new[..., 3], base[..., 2])


def test_reweight_scales_the_right_token(tiny):
    edit = _prepared(tiny, "a cat on a mat", "a cat on a mat", mode="reweight", equalizer={"cat": 2.0})._edit
    expected = torch.ones(77)
    expected[2] = 2.0  # <start> a cat ...
    assert torch.equal(edit.equalizer, expected)
    base, target = torch.rand(2, 2, 4, 77).unbind(0)
    assert torch.equal(edit(base, target), target * expected)  # reweight alone injects nothing


def test_processor_gives_target_the_source_maps_with_its_own_values(tiny):
    """One attn2 layer, batch [source, cond] of the same tokens: cond output = source probs @ cond values."""
    editor = _prepared(tiny, "a dog on a mat", "a cat on a mat", guidance_scale=1.0)
    name = "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    attn = tiny.unet.get_submodule(name)
    emb = torch.cat([editor._embeddings[SOURCE].hidden, editor._embeddings["cond"].hidden])
    step = Step(0, 500, STEPS, "frames", torch.arange(1), torch.arange(0),
                (Branch(SOURCE, emb[:1], "source"), Branch("cond", emb[1:])))
    proc = P2PCrossAttention(name, attn.processor, editor._edit, None, lambda: step, "cond")
    x = torch.randn(1, 16, attn.to_q.in_features).expand(2, -1, -1)
    with torch.no_grad():
        out = proc(attn, x, emb)
        q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(x), attn.to_k(emb), attn.to_v(emb)))
        probs = attn.get_attention_scores(q, k).unflatten(0, (2, attn.heads))
        expected = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs[0], v.unflatten(0, (2, -1))[1]))))
        plain = attn.processor(attn, x, encoder_hidden_states=emb)
    assert torch.allclose(out[1], expected[0], atol=1e-5) and torch.allclose(out[0], plain[0], atol=1e-5)
    assert not torch.allclose(out[1], plain[1], atol=1e-3)  # the controlled target differs from plain attention


def test_self_attention_replacement_swaps_source_qk_into_cond_at_coarse_layers(tiny):
    editor = _prepared(tiny, "a dog on a mat", "a cat on a mat", self_replace_steps=0.4)
    layout = UNetLayout.from_unet(tiny.unet)
    before = dict(tiny.unet.attn_processors)
    handles = editor.install(tiny.unet, layout, lambda: None)
    assert all(isinstance(tiny.unet.get_submodule(n).processor, P2PCrossAttention) for n in layout.cross_attention)
    for h in handles:
        h.remove()
    assert all(tiny.unet.attn_processors[k] is v for k, v in before.items())
    # two 2x downsamplings below the latent, as P2P's <= 16x16 at 512 px: down 2, mid, up 1
    assert sorted({n.split(".attentions")[0] for n in editor._self_layers}) == ["down_blocks.2", "mid_block", "up_blocks.1"]
    layer = next(iter(editor._self_layers))
    emb = editor._embeddings[SOURCE]
    branches = (Branch(SOURCE, emb, "source"), Branch("uncond", emb), Branch("cond", emb))
    q, k, v = torch.randn(3, 3, 2, 4, 8).unbind(0)
    for index, replaced in ((1, True), (2, False)):  # int(5 * 0.4) = 2 steps
        step = Step(index, 0, STEPS, "keyframes", torch.arange(2), torch.arange(2), branches)
        q2, k2, v2 = editor.self_attention(layer, q, k, v, step)
        assert torch.equal(q2[2], q[0]) == replaced and torch.equal(k2[2], k[0]) == replaced
        assert torch.equal(q2[:2], q[:2]) and torch.equal(k2[:2], k[:2]) and v2 is v
    assert editor.self_attention("down_blocks.0.attentions.0.transformer_blocks.0.attn1", q, k, v, step)[0] is q


def test_null_text_embeddings_are_the_unconditional_branch(tiny):
    null = torch.randn(2, 3, 77, tiny.unet.config.cross_attention_dim)
    inversion = InversionResult([21, 1], torch.zeros(2, 3, 4, 8, 8), torch.zeros(3, 4, 8, 8), "a cat", {},
                                NullTextEmbeddings(null, 7.5))
    editor = PromptToPromptEditor()
    editor.prepare(EditInputs(tiny, inversion, "a dog", "", "a cat", [21, 1]))
    step = Step(1, 1, 2, "propagate", torch.tensor([0, 2]), torch.tensor([0]))
    uncond = {b.name: b for b in editor.branches(step)}["uncond"].embedding
    assert torch.equal(uncond.hidden, null[1])  # the per-frame table (N, L, D); the pipeline takes the call's frames
    with pytest.raises(ConfigError, match="cannot be used with a null-text inversion"):
        editor.prepare(EditInputs(tiny, inversion, "a dog", "ugly", "a cat", [21, 1]))


def test_unequal_token_counts_in_replace_mode_fail(tiny):
    with pytest.raises(ConfigError, match=r"2 tokens in 'a cat' and 3 in 'a fluffy cat'"):
        _prepared(tiny, "a fluffy cat", "a cat", mode="replace")


@pytest.mark.parametrize("config, message", [
    ({"mode": "swap"}, "editor.mode='swap'"), ({"cross_replace_steps": 1.5}, "cross_replace_steps=1.5"),
    ({"blend_threshold": 1.0}, "blend_threshold=1.0"), ({"mode": "reweight"}, "empty equalizer"),
    ({"equalizer": {"cat": -1.0}}, r"equalizer\['cat'\]=-1.0")])
def test_invalid_settings_fail_with_the_value(config, message):
    with pytest.raises(ConfigError, match=message):
        PromptToPromptEditor(**config)


def test_unknown_words_fail(tiny):
    with pytest.raises(ConfigError, match="'dog' does not occur"):
        _prepared(tiny, "a cat", "a cat", equalizer={"dog": 2.0})
    with pytest.raises(ConfigError, match="'dog' occurs in neither"):
        _prepared(tiny, "a cat", "a cat", blend_words=["dog"])


def test_local_blend_mask_geometry():
    """A hot token at (1, 1) of a 4x4 map (level 2 of a 16x16 latent) → 3x3 max-pool → 12x12 block."""
    blend = LocalBlend([1], [1], frozenset({"l"}), level=2, threshold=0.3)
    step = Step(0, 1, 1, "frames", torch.arange(1), torch.arange(0))
    maps = torch.zeros(1, 2, 16, 3)
    maps[0, :, 5, 1] = 1.0  # token 1 attends to position (1, 1) in both heads
    blend.record("l", step, maps, torch.zeros_like(maps))
    mask = blend.mask(step, (16, 16))
    expected = torch.zeros(16, 16)
    expected[:12, :12] = 1
    assert torch.equal(mask[0, 0], expected)


@pytest.fixture(scope="module")
def clip_edit(tiny, clip8):
    """4 frames (synthetic, and wolf.mp4 where ../shared is) through TokenFlow + P2P (refine, reweight, LocalBlend), recording masks and processors.

    LocalBlend's mask is the real one with its left half cleared: the blend must keep the source there.
    """
    video = Video.from_tensor(clip8.to_tensor()[:4], fps=clip8.fps)
    inversion = invert_video(tiny, video, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", progress=False)[0]
    editor = PromptToPromptEditor(mode="refine", equalizer={"fluffy": 2.0}, blend_words=["wolf"])
    pipe = TokenFlowPipeline(tiny, editor, TokenFlowPropagator(), RandomKeyframes(2, seed=0), n_steps=STEPS, chunk_size=2)
    masks, original_mask = [], LocalBlend.mask

    def record(self, step, size):
        # the tiny random model's word maps are near uniform (the real mask is ~all ones): keep the left half
        # of the real mask so that the outside is not empty
        mask = original_mask(self, step, size)
        mask[..., : size[1] // 2] = 0
        masks.append((step.index, step.phase, step.frames.clone(), mask))
        return mask

    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, tiny.unet.config.cross_attention_dim, generator=g)
    before = dict(tiny.unet.attn_processors)
    with torch.no_grad():
        reference = tiny.unet(x, 501, encoder_hidden_states=emb).sample
    LocalBlend.mask = record
    try:
        result = pipe.edit(inversion, "a fluffy wolf", "ugly", progress=False)
    finally:
        LocalBlend.mask = original_mask
    with torch.no_grad():
        after = tiny.unet(x, 501, encoder_hidden_states=emb).sample
    return dict(result=result, inversion=inversion, masks=masks, before=before, reference=reference, after=after)


def test_tokenflow_pipeline_runs_and_restores_the_unet(tiny, clip_edit):
    assert torch.isfinite(clip_edit["result"].latents).all()
    assert set(tiny.unet.attn_processors) == set(clip_edit["before"])
    assert all(tiny.unet.attn_processors[k] is v for k, v in clip_edit["before"].items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.unet.modules())
    assert torch.equal(clip_edit["reference"], clip_edit["after"])


def test_local_blend_keeps_the_source_outside_the_mask(clip_edit):
    latents, clean = clip_edit["result"].latents, clip_edit["inversion"].clean
    last = [(frames, mask) for index, phase, frames, mask in clip_edit["masks"] if index == STEPS - 1]
    assert sorted(torch.cat([f for f, _ in last]).tolist()) == [0, 1, 2, 3]  # keyframe pass + chunks of the others
    for frames, mask in last:
        outside = (mask == 0).expand(-1, 4, -1, -1)
        assert 0 < outside.float().mean() < 1, float(outside.float().mean())
        assert torch.equal(latents[frames][outside], clean[frames][outside])
        assert not torch.equal(latents[frames][~outside], clean[frames][~outside])
