"""ControlNetEditor: diffusers' ControlNet pipelines as the oracle, residuals only on edit branches, condition maps."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import translation_clip
from tokenflow import (DDIMInverter, InversionResult, NoPropagation, RandomKeyframes, TokenFlowPipeline,
                       TokenFlowPropagator)
from tokenflow.editors import CFGEditor, ControlNetEditor, PnPEditor
from tokenflow.editors.conditions import canny, condition_maps, input_frames, soft_edges
from tokenflow.editors.controlnet import ControlSpec, load_controlnet
from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.models.ddim import ddim_timesteps
from tokenflow.models.tiny_extras import TinyControlNetSpec, tiny_controlnet_folder

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


@pytest.fixture(scope="module")
def clip():
    return translation_clip(n=4, size=64, shift=8)


@pytest.fixture(scope="module")
def second_net(tiny, cache_dir):
    """A second tiny ControlNet (another seed), loaded from its folder like a downloaded one."""
    return str(tiny_controlnet_folder(cache_dir, tiny.unet, TinyControlNetSpec(seed=1)))


@pytest.fixture(scope="module")
def inversion(tiny, clip):
    """A 2-step DDIM inversion of the 4-frame clip (for the PnP base, which reads the source branch)."""
    clean = tiny.encode_images(clip.to_tensor())
    return DDIMInverter(n_steps=2, keep_steps=2).invert(tiny, clean, "a dog", progress=False)


def editor(cache_dir, base="pnp", **controls) -> ControlNetEditor:
    controls = controls or {"canny": {"source": "tiny"}}
    base_editor = PnPEditor(guidance_scale=5.0) if base == "pnp" else CFGEditor(guidance_scale=5.0)
    return ControlNetEditor(base=base_editor, controlnets=controls, cache_dir=str(cache_dir))


def given_latents(tiny, clip, steps: int, n: int) -> InversionResult:
    """An "inversion" holding only seeded random latents at the first timestep: sampling starts from them."""
    clean = tiny.encode_images(clip.to_tensor()[:n])
    x = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    return InversionResult([ddim_timesteps(tiny.scheduler, steps)[0]], x[None], clean, "", {})


def diffusers_controlnet(tiny, nets):
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        controlnet=nets[0] if len(nets) == 1 else list(nets), scheduler=DDIMScheduler.from_config(tiny.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- (a, c) outside oracle: diffusers' StableDiffusionControlNetPipeline, one and two ControlNets ---------------
@pytest.mark.parametrize("two", [False, True], ids=["one-controlnet", "multicontrolnet"])
def test_per_frame_edit_equals_diffusers_controlnet_pipeline(tiny, clip, cache_dir, second_net, two):
    steps, n = 3, 2
    controls = {"canny": {"source": "tiny", "scale": 0.7}}
    if two:  # diffusers' windows: step i runs when start <= i/3 and (i+1)/3 <= end, so canny runs at steps 0-1
        # (off at the last), a second net on soft edges at steps 1-2; both, summed, at step 1
        controls = {"canny": {"source": "tiny", "scale": 0.7, "end": 0.67},
                    "soft": {"source": second_net, "condition": "softedge", "scale": 0.4, "start": 0.3}}
    ours = editor(cache_dir, "cfg", **controls)
    inv = given_latents(tiny, clip, steps, n)
    result = TokenFlowPipeline(tiny, ours, NoPropagation(), n_steps=steps, chunk_size=n).edit(inv, PROMPT, NEGATIVE,
                                                                                             progress=False)
    nets, maps = [c.net for c in ours.controls], [c.maps for c in ours.controls]
    pipe = diffusers_controlnet(tiny, nets)
    kw = dict(controlnet_conditioning_scale=[0.7, 0.4], control_guidance_start=[0.0, 0.3],
              control_guidance_end=[0.67, 1.0]) if two else dict(controlnet_conditioning_scale=0.7)
    expected = pipe(prompt=[PROMPT] * n, negative_prompt=[NEGATIVE] * n, image=maps if two else maps[0],
                    latents=inv.latents[0].clone(), num_inference_steps=steps, guidance_scale=5.0,
                    output_type="latent", **kw).images
    assert result.timesteps == [int(t) for t in pipe.scheduler.timesteps]
    # same weights and formulas; float32 rounding only (DDIM step written differently, ControlNet per branch
    # here and over the [uncond, cond] batch there): ~1.5e-6 measured
    torch.testing.assert_close(result.latents, expected, atol=1e-5, rtol=0)
    assert (result.latents - inv.latents[0]).abs().max() > 0.1  # it did move


# ---- (b, e) TokenFlow end to end; only the edit branches are controlled, with their own frames' maps ------------
def test_tokenflow_run_controls_edit_branches_only(tiny, clip, inversion, cache_dir):
    ours = editor(cache_dir, "pnp")
    pipe = TokenFlowPipeline(tiny, ours, TokenFlowPropagator(), RandomKeyframes(stride=2, seed=0), n_steps=2,
                             chunk_size=2)
    records, unet_calls = [], []
    spied = ours.residuals

    def residuals(call):  # the branches hand out this (instance) attribute
        out = spied(call)
        records.append((call, out))
        return out

    def on_unet(module, args, kwargs):
        unet_calls.append((args[0].clone(), kwargs["encoder_hidden_states"].clone(),
                           kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual")))

    ours.residuals = residuals
    handle = tiny.unet.register_forward_pre_hook(on_unet, with_kwargs=True)
    try:
        result = pipe.edit(inversion, PROMPT, NEGATIVE, progress=False, video=clip)
    finally:
        handle.remove()
    assert result.frames.shape == (4, 64, 64, 3) and {len(k) for k in result.keyframes} == {2}
    # per step: keyframe pass (2) + the 2 other frames, each x (source, uncond, cond)
    assert result.unet_evaluations == 2 * 3 * 4 and len(unet_calls) == 2 * 2
    assert len(records) == 2 * len(unet_calls)  # one ControlNet evaluation per edit branch, none for the source
    control = ours.controls[0]
    for j, (sample, text, down, mid) in enumerate(unet_calls):
        f = sample.shape[0] // 3
        assert all(d[:f].abs().max() == 0 for d in down) and mid[:f].abs().max() == 0  # source rows: zeros
        for b, (call, out) in enumerate(records[2 * j : 2 * j + 2], start=1):
            rows = slice(b * f, (b + 1) * f)
            assert call.step.names == ("source", "uncond", "cond") and call.step.names[b] in ("uncond", "cond")
            assert torch.equal(call.latents, sample[rows]) and torch.equal(call.text.hidden, text[rows])
            assert torch.equal(call.latents, sample[f : 2 * f])  # the edited latents, not the source's
            d, m = control.net(call.latents, call.timestep, encoder_hidden_states=call.text.hidden,
                               controlnet_cond=control.maps[call.frames], return_dict=False)
            assert torch.equal(mid[rows], m) and torch.equal(out["mid_block_additional_residual"], m) and m.abs().max() > 0
            assert all(torch.equal(x[rows], y) for x, y in zip(down, d))
    steps = [sorted(torch.cat([c.frames for c, _ in records[4 * i : 4 * i + 4 : 2]]).tolist()) for i in range(2)]
    assert steps == [[0, 1, 2, 3]] * 2  # every frame once per step, with its own maps (checked above)


# ---- (d) conditioning scale 0 is the base editor ---------------------------------------------------------------------
@pytest.mark.parametrize("base", ["pnp", "cfg"])
def test_scale_zero_equals_the_base_editor(tiny, clip, inversion, cache_dir, base):
    def run(ed):
        pipe = TokenFlowPipeline(tiny, ed, TokenFlowPropagator(), RandomKeyframes(stride=2, seed=0), n_steps=2,
                                 chunk_size=2)
        return pipe.edit(inversion, PROMPT, NEGATIVE, progress=False, video=clip).latents

    off = run(editor(cache_dir, base, canny={"source": "tiny", "scale": 0.0}))
    plain = run(PnPEditor(guidance_scale=5.0) if base == "pnp" else CFGEditor(5.0))
    assert torch.equal(off, plain)
    on = run(editor(cache_dir, base, canny={"source": "tiny", "scale": 1.0}))
    assert (on - plain).abs().max() > 1e-3  # and the control does act


# ---- (f) condition maps on synthetic images with known edges -------------------------------------------------------
def _step_image(column: int, low: int, high: int, size: int = 32, axis: int = 1) -> np.ndarray:
    img = np.full((size, size, 3), low, np.uint8)
    if axis == 1:
        img[:, column:] = high
    else:
        img[column:, :] = high
    return img[None]


def test_canny_marks_the_last_pixel_before_a_step_and_obeys_thresholds():
    edges = canny(_step_image(12, 30, 230))
    assert edges.shape == (1, 3, 32, 32) and edges.dtype == torch.float32
    assert torch.equal(edges[0, 0], edges[0, 2])
    expected = torch.zeros(32, 32)
    expected[:, 11] = 1.0  # OpenCV's non-maximum suppression keeps the left of the two equal gradient columns
    assert torch.equal(edges[0, 0], expected)
    rows = canny(_step_image(20, 230, 30, axis=0))[0, 0]
    expected = torch.zeros(32, 32)
    expected[19, :] = 1.0
    assert torch.equal(rows, expected)
    # a step of d grey levels has Sobel L1 magnitude 4d: 80 < low (100) → none; 160 → weak only → none; 240 → edge
    assert canny(_step_image(12, 100, 120)).sum() == 0
    assert canny(_step_image(12, 100, 140)).sum() == 0
    assert canny(_step_image(12, 100, 160))[0, 0, :, 11].sum() == 32
    assert canny(_step_image(12, 100, 140), low_threshold=50, high_threshold=150)[0, 0, :, 11].sum() == 32


def test_soft_edges_peak_on_the_step_and_fall_off_symmetrically():
    maps = soft_edges(np.concatenate([_step_image(16, 0, 255), _step_image(16, 0, 128)]), sigma=1.5)
    profile = maps[0, 0, 16]
    assert torch.equal(maps[0, 0], profile.expand(32, 32))  # constant along the edge
    # the peak: the two pixels either side of the step
    assert profile.max() == 1.0 and float(profile[15]) == pytest.approx(1.0) == float(profile[16])
    for k in range(1, 8):  # symmetric about the step and decreasing away from it
        assert profile[15 - k] == pytest.approx(float(profile[16 + k]), abs=1e-6)
        assert profile[15 - k] < profile[15 - k + 1]
    assert profile[:6].max() < 1e-3 and profile[26:].max() < 1e-3
    # one normalisation for the whole video: a half-contrast step is half as strong in the other frame
    torch.testing.assert_close(maps[1, 0, 16], profile * 128 / 255, atol=2e-3, rtol=0)


def test_precomputed_maps_are_read_and_counted(tmp_path):
    from tokenflow.storage.png import write_frames

    frames = np.stack([np.full((64, 64, 3), 40 * i, np.uint8) for i in range(3)])
    write_frames(tmp_path / "maps", frames)
    maps = condition_maps("maps", frames, maps=str(tmp_path / "maps"))
    assert maps.shape == (3, 3, 64, 64) and torch.allclose(maps[:, 0, 0, 0], torch.tensor([0, 40, 80]) / 255.0)
    with pytest.raises(ConfigError, match="have 3 frames but the video has 2"):
        condition_maps("maps", frames[:2], maps=str(tmp_path / "maps"))


def test_without_input_frames_the_maps_come_from_the_vae_decoding(tiny, clip, caplog):
    from tokenflow import EditInputs
    from tokenflow.storage.video import frames_from_tensor

    clean = tiny.encode_images(clip.to_tensor()[:2])
    inputs = EditInputs(tiny, InversionResult([1], clean[None], clean, "", {}), "", "", "", [1])
    with caplog.at_level(logging.INFO, logger="tokenflow.editors.conditions"):
        frames = input_frames(inputs)
    assert "decoding inversion.clean with the VAE" in caplog.text
    assert np.array_equal(frames, frames_from_tensor(tiny.decode_latents(clean)))


# ---- (g) bad settings: one clear line ------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    (dict(base="controlnet"), "editor.base='controlnet' is unknown — use one of 'pnp', 'cfg'"),
    (dict(base={"pnp_f_t": 0.5}), "editor.base=.* names no editor class — add editor.base._target_="),
    (dict(base={"_target_": "tokenflow.editors.NoSuchEditor"}), "editor.base._target_='tokenflow.editors.NoSuchEditor' "
                                                               "cannot be imported"),
    (dict(base={"_target_": "tokenflow.RandomKeyframes"}), "editor.base is a RandomKeyframes, not a KeyframeEditor"),
    (dict(pnp_f_t=0.5), r"editor.pnp_f_t is a setting of the base editor: editor.base.pnp_f_t=0.5"),
    (dict(controlnets={}), "editor.controlnets is empty"),
    (dict(controlnets={"a": {"condition": "depth"}}), "editor.controlnets.a.condition='depth' is unknown — use one of"),
    (dict(controlnets={"a": {"scale": -1.0}}), r"editor.controlnets.a.scale=-1.0 must be >= 0"),
    (dict(controlnets={"a": {"start": 0.6, "end": 0.5}}), r"must satisfy 0 <= start < end <= 1"),
    (dict(controlnets={"a": {"low_threshold": 300}}), r"low_threshold=300 must be in \[0, high_threshold=200\]"),
    (dict(controlnets={"a": {"condition": "maps"}}), "condition=maps needs editor.controlnets.a.maps="),
    (dict(controlnets={"a": {"sources": "tiny"}}), "editor.controlnets.a has no setting 'sources'"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as e:
        ControlNetEditor(**settings)
    assert "\n" not in str(e.value)


def test_missing_and_mismatched_controlnets_are_one_line(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match="source: ControlNet folder './no/such' does not exist"):
        load_controlnet(ControlSpec(source="./no/such"), tiny)
    missing = "cannot load ControlNet source='tokenflow-tests/no-such-controlnet'.* or use source=tiny"
    with pytest.raises(ModelLoadError, match=missing) as e:
        load_controlnet(ControlSpec(source="tokenflow-tests/no-such-controlnet", local_files_only=True), tiny)
    assert "\n" not in str(e.value)
    from diffusers import ControlNetModel

    config = dict(ControlNetModel.from_unet(tiny.unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                            load_weights_from_unet=False).config)
    ControlNetModel.from_config({**config, "cross_attention_dim": 16}).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="is for another UNet \\(cross_attention_dim 16"):
        load_controlnet(ControlSpec(source=str(tmp_path / "other")), tiny)


# ---- the CLI on the tiny model ------------------------------------------------------------------------------------
def test_cli_runs_editor_controlnet_on_the_tiny_model(tmp_path, cache_dir):
    from test_cli import run

    result = run("tokenflow-edit", "model=tiny", "editor=controlnet", "editor.controlnets.canny.source=tiny",
                 "+editor.controlnets.soft={source: tiny, condition: softedge, scale: 0.5}", "video=sample",
                 "n_frames=2", "height=64", "width=64", "n_steps=2", "keyframe_stride=2", "progress=false",
                 "metrics=none", "prompt=a fox", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("**/metrics.json")).read_text())  # the run report
    assert report["status"] == "ok" and report["info"]["n_frames"] == 2
    assert report["metrics"]["unet_evaluations"] == 2 * 3 * 2  # 2 steps x (source, uncond, cond) x 2 frames


def test_the_wrapping_editor_forwards_the_whole_interface():
    """Every method and property of KeyframeEditor reaches the base editor through WrappingEditor (ControlNet's
    base): a method added to the interface and not forwarded there fails this (ControlNet once forgot check() and
    source_branch())."""
    import inspect

    from tokenflow import KeyframeEditor, WrappingEditor

    calls = []

    class Recorder(KeyframeEditor):
        needs_source, needs_inversion = True, False

        def __getattribute__(self, name):
            value = object.__getattribute__(self, name)
            if callable(value) and not name.startswith("__"):
                def record(*args, **kwargs):
                    calls.append(name)
                    return name
                return record
            if name == "guidance_weight":
                calls.append(name)
            return value

        prepare = branches = guide = lambda *a: None  # noqa: E731

    class Wrapper(WrappingEditor):
        def __init__(self, base):
            self.base = base

    wrapper = Wrapper(Recorder())
    interface = [n for n, v in inspect.getmembers(KeyframeEditor) if not n.startswith("_")
                 and (callable(v) or isinstance(v, property))]
    for name in interface:
        if name in ("needs_source", "needs_inversion", "families", "samplers"):
            continue
        attr = getattr(Wrapper, name)
        assert attr is not getattr(KeyframeEditor, name), f"WrappingEditor does not forward {name}"
        if isinstance(attr, property):
            getattr(wrapper, name)
        else:
            n_args = len(inspect.signature(getattr(KeyframeEditor, name)).parameters) - 1
            calls.clear()
            result = getattr(wrapper, name)(*[None] * n_args)
            returns = inspect.signature(getattr(KeyframeEditor, name)).return_annotation not in ("None", None)
            assert calls == [name] and result == (name if returns else None), name  # the base's result handed back
            continue
        assert calls[-1] == name, name
    assert wrapper.needs_source is True and wrapper.needs_inversion is False


def test_controlnet_refuses_sdxl_before_any_inversion(tiny, cache_dir):
    from types import SimpleNamespace

    sdxl = SimpleNamespace(denoiser=SimpleNamespace(config=SimpleNamespace(addition_embed_type="text_time")))
    net = ControlNetEditor(controlnets={"c": {"source": "tiny"}}, cache_dir=str(cache_dir))
    with pytest.raises(ConfigError, match="addition_embed_type='text_time' \\(SDXL\\), not supported yet"):
        net.check(sdxl)
    net.check(tiny)  # an SD 2.1 UNet (no added conditions) passes


@pytest.mark.parametrize("overrides, base, settings", [
    ([], PnPEditor, dict(guidance_scale=7.5, pnp_f_t=0.8, pnp_attn_t=0.5, conv_layers=None, initial_latent="inverted")),
    (["editor.base.conv_layers=[4,5]", "editor.base.attn_layers=[6]", "editor.base.initial_latent=renoised",
      "editor.base.guidance_scale=3.0"],
     PnPEditor, dict(conv_layers=[4, 5], attn_layers=[6], initial_latent="renoised", guidance_scale=3.0)),
    (["editor.base=cfg"], CFGEditor, dict(guidance_scale=7.5)),
    (["editor@editor.base=cfg", "editor.base.guidance_scale=4.0"], CFGEditor, dict(guidance_scale=4.0)),
])
def test_every_setting_of_the_base_editor_is_reachable_from_the_command_line(overrides, base, settings):
    """editor=controlnet nests its base editor's whole config (conf/editor/pnp.yaml at editor.base): PnP's layers and
    start latent, which ControlNet's own config once left unreachable, are set on the command line."""
    from hydra import compose, initialize_config_module

    from tokenflow.instantiation import build

    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        cfg = compose(config_name="edit", overrides=["video=x.mp4", "editor=controlnet", *overrides])
    built = build(cfg.editor)
    assert type(built.base) is base
    assert {k: getattr(built.base.config, k) for k in settings} == settings
