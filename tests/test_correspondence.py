"""Correspondence fields (tokenflow.evaluation.correspondence): translation recovery, storage, backends, edit equality."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import translation_clip
from tokenflow.editors import PnPEditor
from tokenflow import DDIMInverter, FixedKeyframes, TokenFlowPipeline, TokenFlowPropagator, invert_video
from tokenflow.evaluation.correspondence import (CorrespondenceField, compute_field, coordinate_colormap, plot_field,
                                      resolve_layer, similarity_heatmap, source_tokens, token_grid, warp_keyframe)
from tokenflow.errors import ConfigError
from tokenflow.models.layout import UNetLayout
from tokenflow.core.search import FaissNeighbourSearch, TorchNeighbourSearch, faiss_available

STEPS = 2
SIDE = 16  # token grid of layer 0 for 128x128 frames (latents 16x16)


@pytest.fixture(scope="module")
def shifted(tiny):
    """(video, inversion) of 3 frames, each shifted right by 8 px = 1 token of layer 0."""
    video = translation_clip(n=3, size=128, shift=8)
    inversion = invert_video(tiny, video, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "", progress=False)[0]
    return video, inversion


@pytest.fixture(scope="module")
def shifted_field(tiny, shifted):
    return compute_field(tiny, shifted[1], 0, shifted[1].timesteps[0], keyframes=[0])


@pytest.fixture(scope="module")
def clip_inversion(tiny, clip8):
    return invert_video(tiny, clip8, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a wolf", progress=False)[0]


def _interior(shift: int) -> torch.Tensor:
    """(SIDE, SIDE) bool: the token and its source (shift tokens left) are >= 3 tokens from the borders."""
    ys, xs = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    return (xs - shift >= 3) & (xs < SIDE - 3) & (ys >= 3) & (ys < SIDE - 3)


def test_field_recovers_translation_and_flow(shifted_field):
    field = shifted_field
    assert field.grid == (SIDE, SIDE) and field.index.shape == (3, 1, SIDE * SIDE)
    assert field.index.dtype == torch.int64 and field.similarity.dtype == torch.float32
    assert field.coordinates().shape == (3, 1, SIDE, SIDE, 2)
    ys, xs = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    for frame in (1, 2):
        inside = _interior(frame)
        expected = ys * SIDE + (xs - frame) % SIDE  # frame f at x came from keyframe 0 at x - f
        got = field.index[frame, 0].reshape(SIDE, SIDE)
        assert (got == expected)[inside].float().mean() > 0.95
        flow = field.flow()[frame, 0]
        moved = (flow[..., 0] == 0) & (flow[..., 1] == frame)
        assert moved[inside].float().mean() > 0.95
    assert torch.equal(field.flow()[0, 0], torch.zeros(SIDE, SIDE, 2, dtype=torch.int64))  # keyframe to itself


def test_layer_names_and_grid(tiny):
    layout = UNetLayout.from_unet(tiny.unet)
    assert resolve_layer(layout, 0) == layout.self_attention[0] == resolve_layer(layout, layout.self_attention[0])
    assert resolve_layer(layout, -1) == layout.self_attention[-1]
    for bad in (len(layout.self_attention), "down_blocks.0.attn9"):
        with pytest.raises(ConfigError):
            resolve_layer(layout, bad)
    assert token_grid((64, 64), 4096) == (64, 64) and token_grid((64, 96), 24) == (4, 6)
    assert token_grid((9, 13), 5 * 7) == (5, 7)  # odd sides round up at every downsampling
    with pytest.raises(ValueError):
        token_grid((16, 16), 100)


def test_bad_indices_and_timestep(tiny, shifted):
    inversion = shifted[1]
    with pytest.raises(ConfigError):
        compute_field(tiny, inversion, 0, inversion.timesteps[0], keyframes=[3])
    with pytest.raises(ConfigError):
        compute_field(tiny, inversion, 0, 123, keyframes=[0])


def _field(seed: int = 0) -> CorrespondenceField:
    g = torch.Generator().manual_seed(seed)
    return CorrespondenceField(torch.randint(0, 12, (3, 2, 12), generator=g), torch.rand(3, 2, 12, generator=g),
                               torch.tensor([0, 2, 5]), torch.tensor([0, 5]), "up.attn1", 501, (3, 4))


def test_save_load_round_trip_is_exact_and_atomic(tmp_path, monkeypatch):
    field = _field()
    path = field.save(tmp_path / "sub" / "field.safetensors")
    back = CorrespondenceField.load(path)
    for name in ("index", "similarity", "frames", "keyframes"):
        got, want = getattr(back, name), getattr(field, name)
        assert torch.equal(got, want) and got.dtype == want.dtype
    assert (back.layer, back.timestep, back.grid) == (field.layer, field.timestep, field.grid)
    assert os.listdir(path.parent) == ["field.safetensors"]  # no temp leftovers

    import tokenflow.evaluation.correspondence as corr

    def broken(tensors, filename, metadata=None):  # writes half a file, then fails
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(corr, "save_file", broken)
    with pytest.raises(OSError):
        _field(1).save(tmp_path / "sub" / "other.safetensors")
    with pytest.raises(OSError):
        _field(1).save(path)  # overwriting: the old file must survive intact
    assert os.listdir(path.parent) == ["field.safetensors"]
    assert torch.equal(CorrespondenceField.load(path).index, field.index)


def test_visualisation_shapes(shifted, shifted_field):
    video, field = shifted[0], shifted_field
    assert coordinate_colormap(field, 1, 0).shape == (SIDE, SIDE, 3)
    heat = similarity_heatmap(field, 2, 0)
    assert heat.shape == (SIDE, SIDE) and heat.dtype == np.float32
    warped = warp_keyframe(field, video.frames[0], 1, 0)
    assert warped.shape == video.frames[0].shape and warped.dtype == np.uint8
    assert np.array_equal(warp_keyframe(field, video.frames[0], 0, 0), video.frames[0])  # identity field
    pixels = np.repeat(np.repeat(_interior(1).numpy(), 8, 0), 8, 1)  # interior tokens, 8 px each
    assert (warped == video.frames[1]).all(-1)[pixels].mean() > 0.95  # the warp reproduces the shifted frame
    fig = plot_field(field, video, 2, 0)
    assert len(fig.axes) >= 4
    with pytest.raises(ConfigError):
        similarity_heatmap(field, 7, 0)


def _assert_same_field(a: CorrespondenceField, b: CorrespondenceField, queries, keys):
    """Equal similarities (1e-5); equal indices except at exact ties (checked in float64)."""
    torch.testing.assert_close(a.similarity, b.similarity, atol=1e-5, rtol=0)
    differ = a.index != b.index
    assert differ.float().mean() < 0.01
    for f, k, s in torch.nonzero(differ).tolist():  # both choices must be (near-)ties
        q = F.normalize(queries[f, s].double(), dim=-1)
        kk = F.normalize(keys[k].double(), dim=-1)
        assert abs(float(q @ kk[a.index[f, k, s]]) - float(q @ kk[b.index[f, k, s]])) < 1e-5


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed (pip install 'tokenflow-video[cpu]')")
@pytest.mark.parametrize("layer", [0, 6])
def test_faiss_and_torch_fields_agree_on_video_tokens(tiny, clip_inversion, layer):
    t, keyframes = clip_inversion.timesteps[0], [1, 5]
    small_blocks = TorchNeighbourSearch(max_block_elements=999)  # many row blocks: still the same field
    exact = compute_field(tiny, clip_inversion, layer, t, keyframes, search=small_blocks)
    flat = compute_field(tiny, clip_inversion, layer, t, keyframes, search=FaissNeighbourSearch("flat"))
    assert exact.layer == flat.layer and exact.grid == flat.grid
    tokens = source_tokens(tiny, clip_inversion, layer, t)
    assert tokens.shape[:2] == (8, exact.grid[0] * exact.grid[1])
    _assert_same_field(exact, flat, tokens, tokens[keyframes])


def test_field_equals_the_matches_of_an_actual_edit(tiny, clip_inversion):
    """compute_field must reproduce, index for index, what the propagator matched at the first edit step."""
    layout = UNetLayout.from_unet(tiny.unet)
    layers = [layout.self_attention[i] for i in (0, 6, 15)]
    keyframes = [1, 5]
    seen: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(layer, frames, keyframe, index, similarity):
        for r, f in enumerate(frames.tolist()):
            seen.setdefault((layer, f, keyframe), (index[r].clone(), similarity[r].clone()))  # first step only

    pipe = TokenFlowPipeline(tiny, PnPEditor(), TokenFlowPropagator(), FixedKeyframes(keyframes), n_steps=STEPS)
    result = pipe.edit(clip_inversion, "a robotic wolf", "ugly", progress=False, on_match=record)
    for layer in layers:
        field = compute_field(tiny, clip_inversion, layer, result.timesteps[0], keyframes)
        pairs = [(f, k) for (name, f, k) in seen if name == layer]
        assert len(pairs) >= 8  # every non-keyframe matched at least one keyframe
        for f, k in pairs:
            fi, ki = field.position(f, k)
            index, similarity = seen[(layer, f, k)]
            assert torch.equal(field.index[fi, ki], index), (layer, f, k)
            torch.testing.assert_close(field.similarity[fi, ki], similarity, atol=1e-6, rtol=0)
