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
from tokenflow.core.keyframes import RandomKeyframes
from tokenflow.core.nulltext import NullTextInverter
from tokenflow.core.pipeline import TokenFlowPipeline, invert_video
from tokenflow.core.propagation import NoPropagation, TokenFlowPropagator
from tokenflow.editors import PnPEditor, PromptToPromptEditor, SDEditEditor
from tokenflow.models.loading import load_model
from tokenflow.models.tiny import TinyModelSpec, tiny_model_folder
from tokenflow.models.variants import checkpoint
from tokenflow.storage.video import Video

VARIANTS = ["sd15", "sd21-base", "sd21", "sdxl"]
STEPS, FRAMES, GUIDANCE = 2, 3, 5.0
# the smallest frames each UNet takes: 3 downsamplings (SD) need latents of 8 (64 px), SDXL's 2 need 4 (32 px)
SIZE = {"sd15": 64, "sd21-base": 64, "sd21": 64, "sdxl": 32}
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
