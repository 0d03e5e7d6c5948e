"""Every editor x propagator x inverter on every tiny variant (SD 1.5, SD 2.1-base, SD 2.1-768-v, SDXL).

3 frames, 2 DDIM steps, through :class:`TokenFlowPipeline`. Each combination must give finite latents
of the right shape, exactly the UNet evaluations its branches and frames imply, and leave the UNet's
attention processors and hooks as it found them. Each variant is built and loaded once per module and
inverted once per inverter.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import UNetCounter
from tokenflow.core.inversion import DDIMInverter
from tokenflow.core.keyframes import FixedKeyframes, RandomKeyframes
from tokenflow.core.nulltext import NullTextInverter
from tokenflow.core.pipeline import TokenFlowPipeline
from tokenflow.core.video_inversion import invert_video
from tokenflow.core.propagation import NoPropagation, TokenFlowPropagator
from tokenflow.editors import CFGEditor, PnPEditor, PromptToPromptEditor, SDEditEditor
from tokenflow.models.layout import UNetLayout
from tokenflow.models.loading import load_model
from tokenflow.models.tiny import TinyModelSpec, tiny_model_folder
from tokenflow.models.variants import checkpoint
from tokenflow.storage.video import Video

VARIANTS = ["sd15", "sd21-base", "sd21-768", "sdxl"]
STEPS, FRAMES, GUIDANCE = 2, 3, 5.0
# the smallest frames each UNet takes: 3 downsamplings (SD) need latents of 8 (64 px), SDXL's 2 need 4 (32 px)
SIZE = {"sd15": 64, "sd21-base": 64, "sd21-768": 64, "sdxl": 32}
EDITORS = {
    "pnp": lambda: PnPEditor(guidance_scale=GUIDANCE),
    "sdedit": lambda: SDEditEditor(guidance_scale=GUIDANCE, strength=0.5),
    "p2p": lambda: PromptToPromptEditor(guidance_scale=GUIDANCE, self_replace_steps=0.5),
}
PROPAGATORS = {"tokenflow": lambda: TokenFlowPropagator(stride=2), "none": NoPropagation}
INVERTERS = {
    "ddim": lambda: DDIMInverter(n_steps=STEPS, keep_steps=STEPS),
    "nulltext": lambda: NullTextInverter(n_steps=STEPS, inner_steps=1, guidance_scale=GUIDANCE),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def loaded(cache_dir):
    """variant -> (model, video, {inverter: inversion}), each built once for the module."""
    cache: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in cache:
            model = load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant=variant)
            g = torch.Generator().manual_seed(0)
            size = SIZE[variant]
            video = Video.from_tensor(torch.rand(FRAMES, 3, size, size, generator=g) * 2 - 1, fps=10.0, source="random")
            cache[variant] = (model, video, {})
        model, video, inversions = cache[variant]
        return model, video, inversions
    return get


def _hooks(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


@pytest.mark.parametrize("variant", VARIANTS)
def test_folder_is_a_diffusers_pipeline_of_the_published_kind(variant, cache_dir):
    """model_index.json lists every component: diffusers' own loader builds the published pipeline from it."""
    from diffusers import DiffusionPipeline

    folder = tiny_model_folder(cache_dir, TinyModelSpec(variant=variant))
    published = checkpoint(variant)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe).__name__ == published.index["_class_name"]
    assert type(pipe.scheduler).__name__ == published.scheduler["_class_name"]
    assert pipe.scheduler.config.prediction_type == published.scheduler["prediction_type"]
    names = ["unet", "vae", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if published.is_sdxl else [])
    assert all(getattr(pipe, n) is not None for n in names)
    assert [t.pad_token for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None] == \
           [t["pad_token"] for t in published.tokenizers]
    assert pipe.vae.config.scaling_factor == published.vae["scaling_factor"]
    assert pipe.vae.config.force_upcast == published.vae.get("force_upcast", True)  # diffusers' default: True
    spec = json.loads((folder / "tiny_spec.json").read_text())
    assert spec["variant"] == variant


# UNet branches per call, by editor: PnP = source (inverted latents, inversion prompt) + uncond + cond; SDEdit =
# uncond + cond, plus the source branch only when the propagator reads source tokens (TokenFlow's
# correspondences); P2P = source + uncond + cond. Steps: PnP and P2P all STEPS, SDEdit at strength 0.5 the
# last round(0.5 x 2) = 1.
BRANCHES = {("pnp", "tokenflow"): 3, ("pnp", "none"): 3, ("sdedit", "tokenflow"): 3, ("sdedit", "none"): 2,
            ("p2p", "tokenflow"): 3, ("p2p", "none"): 3}
N_STEPS = {"pnp": STEPS, "sdedit": 1, "p2p": STEPS}


@pytest.mark.parametrize("inverter", list(INVERTERS))
@pytest.mark.parametrize("propagator", list(PROPAGATORS))
@pytest.mark.parametrize("editor", list(EDITORS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_combination_runs_on_every_variant(loaded, variant, editor, propagator, inverter):
    model, video, inversions = loaded(variant)
    if inverter not in inversions:
        inversions[inverter] = invert_video(model, video, INVERTERS[inverter](), "a wolf", progress=False)[0]
    inversion = inversions[inverter]
    keyframes = RandomKeyframes(stride=2, seed=1)
    pipe = TokenFlowPipeline(model, EDITORS[editor](), PROPAGATORS[propagator](), keyframes, n_steps=STEPS)
    # every frame once per step: TokenFlow's paper blend reuses the keyframe pass, NoPropagation has none
    assert pipe.propagator.reuses_keyframe_pass or not pipe.propagator.uses_keyframes
    expected = BRANCHES[editor, propagator] * FRAMES * N_STEPS[editor]
    processors, hooks = dict(model.unet.attn_processors), _hooks(model.unet)
    with UNetCounter(model.unet) as counter:
        result = pipe.edit(inversion, "a fox", inversion_prompt="a wolf", progress=False, video=video)
    size = SIZE[variant]
    assert result.latents.shape == (FRAMES, 4, size // 8, size // 8) and result.latents.dtype == torch.float32
    assert torch.isfinite(result.latents).all()
    assert result.frames.shape == (FRAMES, size, size, 3)
    assert counter.samples == result.unet_evaluations == expected, (counter.samples, result.unet_evaluations, expected)
    assert len(result.timesteps) == N_STEPS[editor]
    assert dict(model.unet.attn_processors) == processors and all(
        model.unet.attn_processors[k] is v for k, v in processors.items())
    assert _hooks(model.unet) == hooks


class _Recorder(CFGEditor):
    """CFG (no injection) that records, at every self-attention layer and model call, the layer's input and output
    with the call's phase, branch names, frames and keyframes."""

    def __init__(self) -> None:
        super().__init__(guidance_scale=GUIDANCE)
        self.calls: list[tuple] = []  # (layer, step index, phase, names, frames, keyframes, input, output)

    def install(self, unet, layout, step_ref):
        def keep(name):
            def hook(module, args, output):
                step = step_ref()
                self.calls.append((name, step.index, step.phase, step.names, step.frames.tolist(),
                                   step.keyframes.tolist(), args[0].detach().clone(), output.detach().clone()))
            return hook
        return [unet.get_submodule(n).register_forward_hook(keep(n)) for n in layout.self_attention]


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_oracles_hold_on_every_variant(loaded, variant):
    """On each UNet (SD 1.5, 2.1-base, 2.1-768-v with its upcast attention and linear projections, SDXL with its
    multi-block transformers), at every self-attention layer of every call of an edit with keyframes 0 and 2 of 3
    frames: in the keyframe pass the edit branches' outputs are softmax(QKᵀ/√d)V over both keyframes' tokens and the
    source's over its own frame (hand-computed in float64); in the propagate pass frame 1's edit-branch outputs are
    the keyframes' outputs at the nearest neighbours of its source tokens (brute-force cosine), blended 1/2 + 1/2
    (the paper's weights midway), and the source attends per frame. A per-frame "extended" attention, a wrong head
    split, or a gather along the wrong axis fails here."""
    from test_core_oracles import attention_oracle

    model, video, inversions = loaded(variant)
    if "ddim" not in inversions:
        inversions["ddim"] = invert_video(model, video, INVERTERS["ddim"](), "a wolf", progress=False)[0]
    recorder = _Recorder()
    pipe = TokenFlowPipeline(model, recorder, TokenFlowPropagator(stride=2), FixedKeyframes([0, 2]), n_steps=STEPS)
    pipe.edit(inversions["ddim"], "a fox", inversion_prompt="a wolf", progress=False, video=video)
    names_all = {c[0] for c in recorder.calls}
    assert names_all == set(UNetLayout.from_unet(model.unet).self_attention)  # every attn1 was recorded
    kept: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, step) -> (source in, outputs)
    phases = set()
    for name, i, phase, names, frames, keyframes, x_in, out in recorder.calls:
        attn = model.unet.get_submodule(name)
        n_b = len(names)
        src = names.index("source")
        x, out = x_in.unflatten(0, (n_b, -1)), out.unflatten(0, (n_b, -1))
        phases.add(phase)
        with torch.no_grad():
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        if phase == "keyframes":
            assert frames == [0, 2]
            for b in range(n_b):
                expected = attention_oracle(attn, q[b], k[b], v[b], joint=b != src)
                assert torch.allclose(out[b].double(), expected, atol=1e-4, rtol=1e-3), (variant, name, i, names[b])
            kept[name, i] = (x[src], out)
        else:
            assert phase == "propagate" and frames == [1] and keyframes == [0, 2], (phase, frames, keyframes)
            key_source, key_out = kept[name, i]
            sim = torch.nn.functional.normalize(x[src, 0], dim=-1) @ \
                torch.nn.functional.normalize(key_source, dim=-1).transpose(-1, -2)  # (K, S, S)
            nearest = sim.argmax(dim=-1)  # (K, S): each keyframe's token nearest to each of frame 1's
            own = attention_oracle(attn, q[src], k[src], v[src], joint=False)
            assert torch.allclose(out[src].double(), own, atol=1e-4, rtol=1e-3), (variant, name, i)
            for b in range(n_b):
                if b == src:
                    continue
                expected = 0.5 * key_out[b, 0][nearest[0]] + 0.5 * key_out[b, 1][nearest[1]]
                assert torch.allclose(out[b, 0], expected, atol=1e-5, rtol=1e-4), (variant, name, i, names[b])
    assert phases == {"keyframes", "propagate"} and len(kept) == len(names_all) * STEPS
