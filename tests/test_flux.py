"""FLUX.1 as a backbone: outside oracles (diffusers' FluxPipeline on the same tiny weights), extended attention with
RoPE against a hand-written softmax, the attention dispatcher, Euler inversion, TokenFlow edits and refusals."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import translation_clip
from tokenflow import DDIMInverter, TokenFlowPipeline, invert_video
from tokenflow.core.inversion import reconstruct, sample
from tokenflow.core.joint_attention import extended_joint_attention
from tokenflow.core.keyframes import RandomKeyframes
from tokenflow.core.propagation import NoPropagation, TokenFlowPropagator
from tokenflow.editors import CFGEditor, FlowEditEditor, KVInjectionEditor, PnPEditor, SDEditEditor
from tokenflow.errors import ConfigError
from tokenflow.models.flux import FluxModel, image_ids, pack_latents, unpack_latents
from tokenflow.models.trajectory import InversionResult
from tokenflow.samplers import model_sampler

STEPS = 4
T5_TOKENS = 16


def _load(cache_dir, variant):
    from tokenflow.models.loading import load_model

    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant=variant,
                       max_sequence_length=T5_TOKENS)
    assert isinstance(model, FluxModel)
    return model


@pytest.fixture(scope="module")
def dev(cache_dir, one_thread):
    return _load(cache_dir, "flux-dev")


@pytest.fixture(scope="module")
def schnell(cache_dir, one_thread):
    return _load(cache_dir, "flux-schnell")


def _pipe(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(transformer=model.transformer, vae=model.vae, text_encoder=model.text_encoder,
                        tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(model, x: torch.Tensor, guidance: float, prompt: str = "a wolf") -> torch.Tensor:
    with torch.no_grad():
        out = _pipe(model)(prompt=prompt, height=64, width=64, num_inference_steps=STEPS, guidance_scale=guidance,
                           latents=pack_latents(x.clone()), output_type="latent", num_images_per_prompt=len(x),
                           max_sequence_length=T5_TOKENS).images
    return unpack_latents(out, tuple(x.shape[-2:]))


def test_packing_and_position_ids_are_the_pipelines(dev):
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, (8, 6)), x)
    assert torch.equal(image_ids((8, 6)), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_text_embedding_equals_the_pipelines(dev):
    ours = dev.encode_text(["a wolf", "a shiny silver robotic wolf"])
    with torch.no_grad():
        hidden, pooled, _ = _pipe(dev).encode_prompt("a wolf", None, max_sequence_length=T5_TOKENS)
    assert ours.hidden.shape == (2, T5_TOKENS, dev.transformer.config.joint_attention_dim)
    torch.testing.assert_close(ours.hidden[:1], hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled[:1], pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_independent_frames_equal_the_flux_pipeline(request, variant):
    """The library's flow-matching sampler (FLUX's linear σ spacing, dynamic shift on dev) and backbone (packing,
    ids, σ timestep, the guidance input) equal FluxPipeline from the same latents."""
    model = request.getfixturevalue(variant)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = model_sampler(model).grid(STEPS, model.image_seq_len((8, 8)))
    ours = sample(model, x, grid, model.encode_text("a wolf"), progress=False)
    theirs = _theirs(model, x, model.guidance)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())
    assert float((ours - x).abs().max()) > 0.05


def test_the_tokenflow_pipeline_without_propagation_equals_the_flux_pipeline(dev):
    """The whole edit path (the joint-attention processors on double and single blocks, one branch whose guidance
    is the model input, not CFG) reproduces FluxPipeline frame by frame."""
    clip = translation_clip(n=2, size=64, shift=16)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe = TokenFlowPipeline(dev, CFGEditor(guidance_scale=5.0), NoPropagation(), n_steps=STEPS)
    grid = pipe.sampler.grid(STEPS, dev.image_seq_len((8, 8)))
    clean = dev.encode_images(clip.to_tensor())
    result = pipe.edit(InversionResult([grid.timesteps[0]], x[None].clone(), clean, "", {}), "a wolf", progress=False)
    theirs = _theirs(dev, x, 5.0)
    assert torch.allclose(result.latents, theirs, atol=1e-4, rtol=0), float((result.latents - theirs).abs().max())
    assert result.unet_evaluations == 2 * STEPS  # one branch: FLUX's guidance does not double the batch
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in dev.transformer.attn_processors.values())


def test_guidance_is_an_input_of_dev_and_refused_on_schnell(dev, schnell):
    x = torch.randn(1, 16, 8, 8)
    text = dev.encode_text("a wolf")
    a = dev.predict(x, 500.0, text, guidance=torch.tensor([1.0]))
    b = dev.predict(x, 500.0, text, guidance=torch.tensor([7.0]))
    assert float((a - b).abs().max()) > 1e-4
    with pytest.raises(ConfigError, match="no guidance input.*schnell"):
        schnell.predict(x, 500.0, schnell.encode_text("a wolf"), guidance=torch.tensor([3.5]))


def _rope_oracle(attn, img, txt, rotary, single: bool) -> torch.Tensor:
    """Extended attention by hand, float64: every frame's image queries (RoPE at that frame's own positions — the
    same grid in every frame) against all frames' image keys and the frame's own text keys."""
    from diffusers.models.embeddings import apply_rotary_emb

    f, s, _ = img.shape
    n_text = txt.shape[1]
    h, d = attn.heads, attn.head_dim

    def proj(x, lin, norm):
        y = lin(x).unflatten(-1, (h, d))
        return y if norm is None else norm(y)

    tq_lin, tk_lin, tv_lin = ((attn.to_q, attn.to_k, attn.to_v) if single else
                              (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    tnq, tnk = (attn.norm_q, attn.norm_k) if single else (attn.norm_added_q, attn.norm_added_k)
    cos, sin = rotary
    img_rot, txt_rot = (cos[n_text:], sin[n_text:]), (cos[:n_text], sin[:n_text])
    q = apply_rotary_emb(proj(img, attn.to_q, attn.norm_q), img_rot, sequence_dim=1).double()
    k = apply_rotary_emb(proj(img, attn.to_k, attn.norm_k), img_rot, sequence_dim=1).double()
    v = proj(img, attn.to_v, None).double()
    tk = apply_rotary_emb(proj(txt, tk_lin, tnk), txt_rot, sequence_dim=1).double()
    tv = proj(txt, tv_lin, None).double()
    out = []
    for i in range(f):
        keys = torch.cat([k.reshape(1, f * s, h, d)[0], tk[i]])
        values = torch.cat([v.reshape(1, f * s, h, d)[0], tv[i]])
        w = torch.softmax(torch.einsum("shd,thd->hst", q[i], keys) / d ** 0.5, dim=-1)
        out.append(torch.einsum("hst,thd->shd", w, values).flatten(1))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_extended_attention_with_rope_equals_a_hand_written_softmax(dev, kind):
    transformer = dev.transformer
    block = transformer.transformer_blocks[0] if kind == "double" else transformer.single_transformer_blocks[0]
    attn, width = block.attn, transformer.inner_dim
    g = torch.Generator().manual_seed(0)
    n_frames, hw, n_text = 3, (8, 8), 5
    s = (hw[0] // 2) * (hw[1] // 2)
    img, txt = torch.randn(n_frames, s, width, generator=g), torch.randn(n_frames, n_text, width, generator=g)
    ids = torch.cat([torch.zeros(n_text, 3), image_ids(hw)])
    rotary = transformer.pos_embed(ids)
    with torch.no_grad():
        got, _ = extended_joint_attention(attn, img, txt, True, chunk=7, rotary=rotary, single=kind == "single")
        raw = _rope_oracle(attn, img, txt, rotary, kind == "single").float()
        want = raw if kind == "single" else attn.to_out[0](raw)
        # per frame (joint=False) it is the stock processor, which attends over [text, image] in one sequence
        own, own_txt = extended_joint_attention(attn, img, txt, False, chunk=64, rotary=rotary, single=kind == "single")
        if kind == "double":
            stock_img, stock_txt = attn.processor(attn, img, txt, None, rotary)
        else:
            stock = attn.processor(attn, torch.cat([txt, img], dim=1), None, None, rotary)
            stock_txt, stock_img = stock[:, :n_text], stock[:, n_text:]
    assert float((got - want).abs().max()) < 1e-5
    assert float((own - stock_img).abs().max()) < 1e-5 and float((own_txt - stock_txt).abs().max()) < 1e-5
    # the positions matter: without RoPE the result differs
    with torch.no_grad():
        plain, _ = extended_joint_attention(attn, img, txt, True, chunk=7, rotary=None, single=kind == "single")
    assert float((plain - got).abs().max()) > 1e-3


def test_the_library_processors_honour_the_attention_backend(dev, monkeypatch):
    """transformer.set_attention_backend(...) and diffusers' attention_backend(...) context choose the kernel that
    TokenFlow's processors call (through dispatch_attention_fn), during an edit with extended attention."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

    name = AttentionBackendName._NATIVE_MATH
    calls = []
    kernel = _AttentionBackendRegistry._backends[name]
    monkeypatch.setitem(_AttentionBackendRegistry._backends, name,
                        lambda **kw: calls.append(kw["key"].shape) or kernel(**kw))
    clip = translation_clip(n=3, size=64, shift=16)
    pipe = TokenFlowPipeline(dev, SDEditEditor(strength=1.0, guidance_scale=3.5), TokenFlowPropagator(),
                             RandomKeyframes(stride=2), n_steps=2, inverter=DDIMInverter(n_steps=2, keep_steps=2))
    inversion, _ = invert_video(dev, clip, pipe.inverter, "a wolf", progress=False)
    assert not calls  # the default backend so far
    # set_attention_backend also makes the backend globally active: put the global back (restored after the test
    # too), so that only the processors' own _attention_backend can choose the kernel here
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    default = _AttentionBackendRegistry._active_backend
    dev.transformer.set_attention_backend("_native_math")
    _AttentionBackendRegistry.set_active_backend(default)
    try:
        pipe.edit(inversion, "a robotic wolf", inversion_prompt="a wolf", progress=False)
    finally:
        dev.transformer.reset_attention_backend()
    by_backend = len(calls)
    assert by_backend > 0 and any(shape[1] > 16 + T5_TOKENS for shape in calls)  # extended: several frames' keys
    pipe.edit(inversion, "a robotic wolf", inversion_prompt="a wolf", progress=False)
    assert len(calls) == by_backend  # reset: the default kernel again
    with attention_backend("_native_math"):
        pipe.edit(inversion, "a robotic wolf", inversion_prompt="a wolf", progress=False)
    assert len(calls) > by_backend


def test_euler_inversion_round_trips(dev):
    clip = translation_clip(n=2, size=64, shift=16)
    inversion, _ = invert_video(dev, clip, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", progress=False)
    assert inversion.timesteps == model_sampler(dev).grid(STEPS, dev.image_seq_len((8, 8))).timesteps
    back = reconstruct(dev, inversion, progress=False)
    error = float((back - inversion.clean).norm() / inversion.clean.norm())
    assert error < 0.01, error


@pytest.mark.parametrize("propagator", ["tokenflow", "none"])
@pytest.mark.parametrize("editor", ["sdedit", "kv_injection", "flowedit"])
def test_tokenflow_edits_a_clip_on_flux(dev, editor, propagator):
    """Each editor x propagator runs end to end on FLUX.1-dev: finite frames, the expected transformer evaluations
    (no CFG batch: one branch per prompt), and FlowEdit without an inversion pass."""
    clip = translation_clip(n=4, size=64, shift=16)
    make = {"sdedit": lambda: SDEditEditor(strength=1.0, guidance_scale=3.5),
            "kv_injection": lambda: KVInjectionEditor(guidance_scale=3.5),
            "flowedit": lambda: FlowEditEditor(n_max=3, src_guidance_scale=1.5, tar_guidance_scale=5.5)}[editor]
    prop = TokenFlowPropagator() if propagator == "tokenflow" else NoPropagation()
    pipe = TokenFlowPipeline(dev, make(), prop, n_steps=STEPS, inverter=DDIMInverter(n_steps=STEPS, keep_steps=STEPS))
    result = pipe(clip, "a robotic wolf", inversion_prompt="a wolf", progress=False)
    assert result.frames.shape == (4, 64, 64, 3) and torch.isfinite(result.latents).all()
    per_frame = {"sdedit": 2 if propagator == "tokenflow" else 1, "kv_injection": 2, "flowedit": 2}[editor]
    steps = 3 if editor == "flowedit" else STEPS
    assert result.unet_evaluations == per_frame * 4 * steps
    assert (result.timings["inversion_s"] > 0)
    assert float((result.latents - pipe.model.encode_images(clip.to_tensor())).abs().max()) > 1e-3


def test_unet_editors_are_refused_on_flux_before_inversion(dev):
    clip = translation_clip(n=2, size=64, shift=16)
    pipe = TokenFlowPipeline(dev, PnPEditor(), TokenFlowPropagator(), n_steps=STEPS)
    with pytest.raises(ConfigError, match=r"PnPEditor drives an SD UNet .* FLUX"):
        pipe(clip, "a robotic wolf", inversion_prompt="a wolf", progress=False)


def test_from_pipeline_and_layout(dev):
    same = FluxModel.from_pipeline(_pipe(dev))
    assert same.fingerprint == dev.fingerprint and same.family == "mmdit"
    layout = dev.layout()
    double = len(dev.transformer.transformer_blocks)
    assert layout.rope and layout.patch_size == 2 and layout.n_blocks == double + len(dev.transformer.single_transformer_blocks)
    assert layout.block["single_transformer_blocks.0.attn"] == double
    assert set(layout.single_stream) == {n for n in layout.self_attention if n.startswith("single_")}
