"""FlowPropagator: warping conventions against brute force, token-grid resampling, occlusion fallback, the flow
cache, and end-to-end cost through the pipeline and the CLI (tiny model)."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import UNetCounter, translating_clip, translation_clip
from tokenflow import DDIMInverter, FixedKeyframes, RandomKeyframes, TokenFlowPipeline, invert_video
from tokenflow.core.flow_propagation import FlowPropagator, consistent_pixels, resample_flow, sampling_grid
from tokenflow.core.propagation import PropagationInputs, PropagationQuery
from tokenflow.editors import PnPEditor, SDEditEditor
from tokenflow.errors import ConfigError, VideoError


class OracleFlow:
    """Known flows instead of OpenCV. Frame i is identified by its pixel [0, 0, 0] == i.

    ``motion(a, b)`` → (dx, dy) pixels of a uniform translation a → b, or ``table[(a, b)]`` (H, W, 2); counts calls.
    """

    def __init__(self, motion=None, table=None):
        self.motion, self.table, self.calls = motion, table or {}, 0

    def settings(self):
        return {"estimator": "oracle"}

    def __call__(self, src, dst):
        self.calls += 1
        a, b = int(src[0, 0, 0]), int(dst[0, 0, 0])
        if (a, b) in self.table:
            return self.table[(a, b)].astype(np.float32)
        flow = np.zeros((*src.shape[:2], 2), np.float32)
        if self.motion is not None:
            flow[..., 0], flow[..., 1] = self.motion(a, b)
        return flow


def indexed_frames(n, h, w):
    """(n, h, w, 3) uint8 frames whose pixel [0, 0, 0] is the frame index (for OracleFlow)."""
    frames = np.full((n, h, w, 3), 128, np.uint8)
    frames[:, 0, 0, 0] = np.arange(n)
    return frames


def inputs(frames, schedule, latent_hw):
    return PropagationInputs(model=None, inversion=None, timesteps=list(range(len(schedule))), keyframes=schedule,
                             latent_hw=latent_hw, frames=frames)


def query(frames, keyframes, outputs, grid):
    return PropagationQuery("layer", grid, 1, torch.tensor(frames), torch.tensor(keyframes), outputs)


def brute_force(frame, keyframes, kf_tokens, shifts, fallback):
    """Expected output (B, h, w, D) of a frame under integer token shifts, by explicit indexing.

    kf_tokens[k] (B, h, w, D); shifts[k] = (dx, dy) tokens frame → keyframe k. The paper's weights by hand;
    a token whose target is off-grid is inconsistent; none consistent → fallback on border-clamped samples.
    """
    prev = max(k for k in keyframes if k <= frame)
    nxt = min(k for k in keyframes if k >= frame)
    weights = {prev: 1.0} if prev == nxt else {prev: (nxt - frame) / (nxt - prev), nxt: (frame - prev) / (nxt - prev)}
    b, h, w, d = kf_tokens[keyframes[0]].shape
    out = torch.zeros(b, h, w, d)
    for y in range(h):
        for x in range(w):
            sample, valid = {}, {}
            for k in weights:
                tx, ty = x + shifts[k][0], y + shifts[k][1]
                valid[k] = 0 <= tx < w and 0 <= ty < h
                sample[k] = kf_tokens[k][:, min(max(ty, 0), h - 1), min(max(tx, 0), w - 1)]
            total = sum(weights[k] for k in weights if valid[k])
            if total > 0:
                use = {k: weights[k] / total for k in weights if valid[k]}
            elif fallback == "nearest":
                use = {prev if weights[prev] >= weights.get(nxt, 0) else nxt: 1.0}
            else:
                use = weights
            out[:, y, x] = sum(wk * sample[k] for k, wk in use.items())
    return out


# ---- (a) warping a synthetic translation --------------------------------------------------------
@pytest.mark.parametrize("fallback", ["blend", "nearest"])
@pytest.mark.parametrize("size, latent_hw, grid, shift", [
    ((128, 128), (16, 16), (16, 16), (1, 0)),   # content moves 1 token per frame to the left
    ((128, 128), (16, 16), (8, 8), (1, 0)),     # a coarser layer: the flow averaged over 2x2 latent cells
    ((64, 128), (8, 16), (4, 8), (1, -1)),      # rectangular grid, diagonal motion: x and y conventions
    ((128, 128), (16, 16), (16, 16), (2, 1)),   # corners seen by no keyframe: the fallback
])
def test_translation_warp_equals_shifted_keyframe_tokens(size, latent_hw, grid, shift, fallback):
    """Content moving by (-sx, -sy) tokens per frame: every warped token equals the brute-force shifted keyframe
    token (both keyframes consistent: the paper blend; one: that one alone; none: the fallback on clamped samples)."""
    n, (h, w), (sx, sy) = 5, grid, shift
    px_x, px_y = size[1] // w, size[0] // h  # pixels per token of this grid
    oracle = OracleFlow(motion=lambda a, b: (-(b - a) * sx * px_x, -(b - a) * sy * px_y))
    prop = FlowPropagator(oracle, cache=False, fallback=fallback)
    keyframes = [0, 4]
    prop.prepare(inputs(indexed_frames(n, *size), [keyframes], latent_hw))
    g = torch.Generator().manual_seed(0)
    pad = (n - 1) * max(abs(sx), abs(sy))
    canvas = torch.randn(2, h + 2 * pad, w + 2 * pad, 3, generator=g)  # frame t = canvas window moved by t·(sx, sy)
    tokens = {t: canvas[:, pad + t * sy: pad + t * sy + h, pad + t * sx: pad + t * sx + w] for t in range(n)}
    outputs = torch.stack([tokens[k].reshape(2, h * w, 3) for k in keyframes], 1)
    out = prop.propagate(query([1, 2, 3], keyframes, outputs, grid))
    for i, f in enumerate([1, 2, 3]):
        shifts = {k: (-(k - f) * sx, -(k - f) * sy) for k in keyframes}
        expected = brute_force(f, keyframes, {k: tokens[k] for k in keyframes}, shifts, fallback)
        torch.testing.assert_close(out[:, i].reshape(2, h, w, 3), expected, rtol=0, atol=1e-5)
        seen = [(y, x) for y in range(h) for x in range(w)
                if any(0 <= x + dx < w and 0 <= y + dy < h for dx, dy in shifts.values())]
        got = out[:, i].reshape(2, h, w, 3)
        for y, x in seen:  # tokens some keyframe sees are the frame's own shifted tokens
            torch.testing.assert_close(got[:, y, x], tokens[f][:, y, x], rtol=0, atol=1e-5)


def test_keyframe_queried_takes_its_own_output_bit_exactly():
    prop = FlowPropagator(OracleFlow(motion=lambda a, b: (3.0, 1.0)), cache=False)
    prop.prepare(inputs(indexed_frames(3, 64, 64), [[0, 2]], (8, 8)))
    outputs = torch.randn(2, 2, 64, 4)
    out = prop.propagate(query([0, 1, 2], [0, 2], outputs, (8, 8)))
    assert torch.equal(out[:, 0], outputs[:, 0]) and torch.equal(out[:, 2], outputs[:, 1])
    assert prop.reuses_keyframe_pass and not prop.needs_source and prop.source_features == "clean"
    low = prop.propagate(query([0, 1, 2], [0, 2], outputs.bfloat16(), (8, 8)))  # half precision in, out
    assert low.dtype == torch.bfloat16 and torch.equal(low[:, 0], outputs[:, 0].bfloat16())
    torch.testing.assert_close(low[:, 1].float(), out[:, 1], rtol=0.02, atol=0.05)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_opencv_flow_on_a_translating_texture_recovers_the_shift(method):
    """Real OpenCV flow: a smooth texture moving left 8 px (one latent cell) per frame; interior tokens match."""
    frames = translating_clip(n=3, h=128, w=128, shift=8)
    prop = FlowPropagator(method=method, cache=False)
    prop.prepare(inputs(frames, [[0, 2]], (16, 16)))
    for (f, k), pair in prop.pairs.items():
        interior = pair.flow[:, 2:14, 2:14]
        assert (interior[0] - (k - f) * -1.0).abs().max() < 0.05 and interior[1].abs().max() < 0.05, (method, f, k)
    canvas = torch.randn(2, 16, 18, 3, generator=torch.Generator().manual_seed(0))
    tokens = {t: canvas[:, :, t: t + 16] for t in range(3)}
    outputs = torch.stack([tokens[0].reshape(2, 256, 3), tokens[2].reshape(2, 256, 3)], 1)
    out = prop.propagate(query([1], [0, 2], outputs, (16, 16)))[:, 0].reshape(2, 16, 16, 3)
    assert (out - tokens[1])[:, 2:14, 2:14].abs().max() < 0.05


# ---- (b) token-grid resampling ---------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(8, 16), (4, 8), (2, 4), (1, 1)])
def test_resample_flow_is_the_mean_over_each_tokens_pixels_in_token_units(grid):
    H, W = 64, 128
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    flow = torch.stack([0.3 * xs - 0.1 * ys, torch.sin(xs / 7) * 5]) + torch.randn(2, H, W, generator=g)
    h, w = grid
    ph, pw = H // h, W // w
    expected = torch.zeros(2, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            block = flow[:, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].double()
            expected[0, i, j] = block[0].mean() / pw  # pixels → tokens
            expected[1, i, j] = block[1].mean() / ph
    torch.testing.assert_close(resample_flow(flow, grid).double(), expected, rtol=0, atol=1e-5)
    # what the propagator does: pixels → latent cells (cached) → the layer's grid, equal to pixels → grid directly
    via_latent = resample_flow(resample_flow(flow, (8, 16)), grid)
    torch.testing.assert_close(via_latent.double(), expected, rtol=0, atol=1e-5)


def test_sampling_grid_convention_half_token_is_the_neighbour_mean():
    """Flow +0.5 token in x samples halfway between a token and its right neighbour (align_corners=False)."""
    h, w = 3, 5
    values = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w) ** 2
    flow = torch.zeros(2, h, w)
    flow[0] = 0.5
    flow[1, 1] = -1.0  # row 1 reads row 0
    out = torch.nn.functional.grid_sample(values, sampling_grid(flow)[None], mode="bilinear", padding_mode="border",
                                          align_corners=False)[0, 0]
    v = values[0, 0]
    for y in range(h):
        src = y - 1 if y == 1 else y
        for x in range(w - 1):
            assert out[y, x].item() == pytest.approx((v[src, x] + v[src, x + 1]).item() / 2, abs=1e-4)
        assert out[y, w - 1].item() == pytest.approx(v[src, w - 1].item(), abs=1e-4)  # border: clamped


# ---- (c) occlusion -------------------------------------------------------------------------------
def test_consistent_pixels_on_constructed_flows():
    H, W = 16, 24
    fwd, bwd = np.zeros((H, W, 2), np.float32), np.zeros((H, W, 2), np.float32)
    fwd[:, :, 0] = 2.0
    bwd[:, :, 0] = -2.0          # consistent everywhere the target is inside...
    bwd[4:8, 10:14, 1] = 3.0     # ...except where the backward flow disagrees (an occluder in the target)
    ok = consistent_pixels(fwd, bwd)
    expected = np.ones((H, W), bool)
    expected[:, W - 2:] = False          # x + 2 > W - 1: lands outside
    expected[4:8, 8:12] = False          # p + f inside the disagreeing region
    assert np.array_equal(ok, expected)
    # UnFlow's tolerance: |f + b|² = 0.36 < 0.01·(4 + 4.36) + 0.5 passes; 0.64 > 0.01·(4 + 4.64) + 0.5 fails
    bwd2 = bwd.copy()
    bwd2[4:8, 10:14, 1] = 0.6
    assert consistent_pixels(fwd, bwd2)[4:8, 8:12].all()
    bwd2[4:8, 10:14, 1] = 0.8
    assert not consistent_pixels(fwd, bwd2)[4:8, 8:12].any()


@pytest.mark.parametrize("fallback", ["blend", "nearest"])
def test_occluded_tokens_take_the_other_keyframe_then_the_fallback(fallback):
    """Static frames (zero flow), keyframes 0 and 4, frame 1 (weights 3/4, 1/4). Backward flows disagree on
    constructed 8x8-pixel tokens: token A inconsistent with keyframe 0 only → keyframe 4 alone; token B with both →
    the fallback; tokens C and F with 16/64 and 32/64 bad pixels stay consistent (>= min_consistent 0.5); D 40/64 not;
    tokens E (three of the 2x2 block at (6, 6)) make that block of the coarser 4x4 layer inconsistent."""
    H = W = 64  # 8x8 latent cells of 8x8 pixels
    bad = lambda cells: _disagreeing(H, W, cells)  # noqa: E731
    e_cells = [(6, 6, 64), (6, 7, 64), (7, 6, 64)]
    table = {(0, 1): bad([(1, 1, 64), (2, 2, 64), (3, 3, 16), (0, 5, 32), (4, 4, 40), *e_cells]), (4, 1): bad([(2, 2, 64)])}
    prop = FlowPropagator(OracleFlow(table=table), cache=False, fallback=fallback)
    prop.prepare(inputs(indexed_frames(5, H, W), [[0, 4]], (8, 8)))
    outputs = torch.randn(1, 2, 64, 2, generator=torch.Generator().manual_seed(1))
    out = prop.propagate(query([1], [0, 4], outputs, (8, 8)))[0, 0].view(8, 8, 2)
    a, b = outputs[0, 0].view(8, 8, 2), outputs[0, 1].view(8, 8, 2)
    blend = 0.75 * a + 0.25 * b
    expected = blend.clone()
    expected[1, 1] = b[1, 1]
    expected[2, 2] = blend[2, 2] if fallback == "blend" else a[2, 2]
    expected[4, 4] = b[4, 4]
    for y, x, _ in e_cells:
        expected[y, x] = b[y, x]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # a coarser layer averages the fractions over 2x2 cells: (0,0) holds A: 3/4; (1,1) B and C: (0 + 0.75 + 2)/4;
    # (2,2) D: (0.375 + 3)/4 — consistent; (3,3) the three E cells: 1/4 — not
    coarse = prop.token_field(1, 0, (4, 4), torch.device("cpu"))[1]
    assert coarse.tolist() == [[True] * 4, [True] * 4, [True] * 4, [True, True, True, False]]


def _disagreeing(H, W, cells):
    """Backward flow (H, W, 2): zero, with the first ``count`` pixels (row-major) of 8x8 cell (y, x) disagreeing."""
    flow = np.zeros((H, W, 2), np.float32)
    for y, x, count in cells:
        block = flow[y * 8:(y + 1) * 8, x * 8:(x + 1) * 8, 1].reshape(-1)
        block[:count] = 5.0
        flow[y * 8:(y + 1) * 8, x * 8:(x + 1) * 8, 1] = block.reshape(8, 8)
    return flow


# ---- (d) the flow cache -----------------------------------------------------------------------------
def _brute_pairs(schedule, n):
    pairs = set()
    for kf in schedule:
        for f in range(n):
            if f in kf:
                continue
            before, after = [k for k in kf if k < f], [k for k in kf if k > f]
            pairs.update((f, k) for k in ([max(before)] if before else []) + ([min(after)] if after else []))
    return pairs


def test_flow_cache_hit_miss_and_partial_reuse(tmp_path):
    n, size = 7, 32
    frames = indexed_frames(n, size, size)
    schedule = RandomKeyframes(stride=3, seed=0).sequence(4, n)
    pairs = _brute_pairs(schedule, n)
    assert set(FlowPropagator.needed_pairs(schedule, n)) == pairs
    ordered = pairs | {(k, f) for f, k in pairs}  # each direction estimated once
    motion = lambda a, b: (float(b - a), 0.5 * (b - a))  # noqa: E731

    first = OracleFlow(motion)
    prop = FlowPropagator(first, cache_dir=str(tmp_path))
    prop.prepare(inputs(frames, schedule, (4, 4)))
    assert first.calls == len(ordered)
    files = list((tmp_path / "flow").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # and no temporary left behind

    again = OracleFlow(motion)
    hit = FlowPropagator(again, cache_dir=str(tmp_path))
    hit.prepare(inputs(frames, schedule, (4, 4)))
    assert again.calls == 0 and set(hit.pairs) == pairs
    for p in pairs:
        assert torch.equal(hit.pairs[p].flow, prop.pairs[p].flow) and torch.equal(hit.pairs[p].consistent, prop.pairs[p].consistent)

    changed = frames.copy()
    changed[3, 5, 5, 1] += 1  # one pixel of one frame
    miss = OracleFlow(motion)
    FlowPropagator(miss, cache_dir=str(tmp_path)).prepare(inputs(changed, schedule, (4, 4)))
    assert miss.calls == len(ordered)

    other = OracleFlow(motion)  # other settings: another entry
    FlowPropagator(other, cache_dir=str(tmp_path), beta=1.0).prepare(inputs(frames, schedule, (4, 4)))
    assert other.calls == len(ordered)

    more = schedule + [[0, 6]]  # a longer schedule computes only the pairs it adds (both directions of each)
    extra = _brute_pairs([[0, 6]], n) - pairs
    added = OracleFlow(motion)
    FlowPropagator(added, cache_dir=str(tmp_path)).prepare(inputs(frames, more, (4, 4)))
    assert extra and added.calls == len(extra | {(k, f) for f, k in extra})
    merged = OracleFlow(motion)  # the entry now holds the union
    FlowPropagator(merged, cache_dir=str(tmp_path)).prepare(inputs(frames, more, (4, 4)))
    assert merged.calls == 0
    assert sorted(p.name for p in (tmp_path / "flow").iterdir() if p.name.startswith(".")) == []


def test_settings_and_frame_checks():
    with pytest.raises(ConfigError, match="propagator.method='raft'"):
        FlowPropagator(method="raft")
    with pytest.raises(ConfigError, match="propagator.fallback"):
        FlowPropagator(fallback="zero")
    with pytest.raises(ConfigError, match="min_consistent=1.5"):
        FlowPropagator(min_consistent=1.5)
    with pytest.raises(VideoError, match="uint8"):
        FlowPropagator(cache=False).prepare(inputs(np.zeros((3, 8, 8, 3), np.float32), [[0]], (1, 1)))
    prop = FlowPropagator(OracleFlow(), cache=False)
    prop.prepare(inputs(indexed_frames(3, 16, 16), [[0]], (2, 2)))
    with pytest.raises(RuntimeError, match="no flow for frame 1 → keyframe 2"):
        prop.propagate(query([1], [0, 2], torch.zeros(1, 2, 4, 1), (2, 2)))


# ---- (e) end to end -----------------------------------------------------------------------------
STEPS = 2


@pytest.fixture(scope="module")
def clip(tiny):
    video = translation_clip(n=4, size=64, shift=8)
    inversion = invert_video(tiny, video, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a texture", progress=False)[0]
    return video, inversion


class CountingFlowPropagator(FlowPropagator):
    def __init__(self, **config):
        super().__init__(**config)
        self.grids = []

    def propagate(self, query):
        assert query.source is None and query.keyframe_source is None
        self.grids.append(query.grid)
        return super().propagate(query)


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_pipeline_unet_evaluations(tiny, clip, tmp_path, editor):
    """N=4, keyframes {0, 3}, chunk 2: keyframe pass + one chunk (frames 1, 2) per step, keyframes reused.
    PnP carries its own source branch: 3 × N per step; SDEdit has no source branch at all: 2 × N
    (with TokenFlowPropagator it carries one: 3 × N, counted in tests/test_sdedit.py)."""
    video, inversion = clip
    n, chunk = 4, 2
    prop = CountingFlowPropagator(cache_dir=str(tmp_path))
    ed = PnPEditor() if editor == "pnp" else SDEditEditor(strength=1.0)
    pipe = TokenFlowPipeline(tiny, ed, prop, FixedKeyframes([0, 3]), n_steps=STEPS, chunk_size=chunk)
    with UNetCounter(tiny.unet) as counter:
        result = pipe.edit(inversion, "a red texture", progress=False, video=video)
    steps = len(result.timesteps)
    branches = 3 if editor == "pnp" else 2
    assert steps == STEPS and result.unet_evaluations == counter.samples == steps * branches * n
    assert counter.calls == steps * (1 + math.ceil((n - 2) / chunk))
    layers = len(pipe.layout.self_attention)
    assert len(prop.grids) == steps * layers and {(8, 8), (4, 4)} <= set(prop.grids)
    assert set(prop.pairs) == {(1, 0), (1, 3), (2, 0), (2, 3)}
    assert torch.isfinite(result.latents).all() and result.frames.shape == (4, 64, 64, 3)


def test_without_frames_the_vae_decodes_the_inversion(tiny, clip, tmp_path, caplog):
    from tokenflow.storage.video import frames_from_tensor

    _, inversion = clip
    decoded = frames_from_tensor(tiny.decode_latents(inversion.clean))
    first = OracleFlow()
    with caplog.at_level(logging.INFO, logger="tokenflow.core.flow_propagation"):
        FlowPropagator(first, cache_dir=str(tmp_path)).prepare(
            PropagationInputs(tiny, inversion, [1], [[0, 3]], (8, 8), None))
    assert "decoding the inverted clean latents with the VAE" in caplog.text and first.calls == 8  # 4 pairs × 2
    given = OracleFlow()  # the same frames passed explicitly hit the entry the decoded ones wrote
    FlowPropagator(given, cache_dir=str(tmp_path)).prepare(PropagationInputs(tiny, inversion, [1], [[0, 3]], (8, 8), decoded))
    assert given.calls == 0
    with pytest.raises(VideoError, match="3 input frames for an inversion of 4 frames"):
        FlowPropagator(OracleFlow(), cache=False).prepare(PropagationInputs(tiny, inversion, [1], [[0]], (8, 8), decoded[:3]))


def test_cli_edit_with_flow_propagator(tmp_path, cache_dir):
    exe = Path(sys.executable).parent / "tokenflow-edit"
    if not exe.exists():
        pytest.skip("tokenflow-edit is not installed in this environment (pip install -e .)")
    flow_dir = tmp_path / "flowcache"
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    args = ["model=tiny", "video=sample", "n_frames=4", "height=64", "width=64", "n_steps=2", "keyframe_stride=2",
            "propagator=flow", "propagator.method=farneback", f"propagator.cache_dir={flow_dir}", "progress=false",
            "prompt=a robotic wolf", "inversion_prompt=a wolf"]
    result = subprocess.run([str(exe), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = sorted((tmp_path / "outputs" / "edit").glob("*/*"))[-1]
    report = json.loads((out / "metrics.json").read_text())
    metrics = report.get("metrics", report)  # figures sit under "metrics" in the run report (flat before)
    assert metrics["unet_evaluations"] == 2 * 3 * 4  # PnP: source + uncond + cond over all 4 frames, 2 steps
    assert len(list((flow_dir / "flow").glob("*.safetensors"))) == 1
    assert "_target_: tokenflow.core.flow_propagation.FlowPropagator" in (out / "config.yaml").read_text()


def test_config_group_validates_keys():
    from hydra import compose, initialize_config_module

    import tokenflow.cli.config  # noqa: F401  registers the run schema
    from tokenflow.instantiation import build

    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        cfg = compose(config_name="edit", overrides=["video=x.mp4", "propagator=flow", "cache_dir=/tmp/c", "use_cache=false"])
        bad = compose(config_name="edit", overrides=["video=x.mp4", "propagator=flow", "propagator.fallback=zero"])
        typo = compose(config_name="edit", overrides=["video=x.mp4", "propagator=flow", "+propagator.methd=dis"])
    prop = build(cfg.propagator)
    assert isinstance(prop, FlowPropagator) and prop.config.cache_dir == "/tmp/c" and prop.config.cache is False
    assert prop.config.method.value == "dis" and prop.config.fallback.value == "blend"
    with pytest.raises(ConfigError, match="fallback"):
        build(bad.propagator)
    with pytest.raises(ConfigError, match="no setting 'methd'"):
        build(typo.propagator)


def test_the_border_rule_of_the_consistency_check_never_decides():
    """consistent_pixels reads the reverse flow with BORDER_REPLICATE; the warp metric used to read it with
    BORDER_CONSTANT. Samples past the frame fail `inside`, so both rules give the same pixels (random flows that
    reach well past every edge)."""
    import cv2

    from tokenflow.core.optical_flow import UNFLOW_ALPHA, UNFLOW_BETA

    rng = np.random.default_rng(0)
    h, w = 24, 32
    for _ in range(5):
        shift = rng.uniform(-6, 6, 2)  # a translation (past the edges) with noise: most pixels consistent, not all
        fwd = (shift + rng.normal(0, 0.4, (h, w, 2))).astype(np.float32)
        bwd = (-shift + rng.normal(0, 0.4, (h, w, 2))).astype(np.float32)
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        mx, my = gx + fwd[..., 0], gy + fwd[..., 1]
        back = cv2.remap(bwd, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        sq = lambda f: (f ** 2).sum(-1)  # noqa: E731
        constant = (sq(fwd + back) < UNFLOW_ALPHA * (sq(fwd) + sq(back)) + UNFLOW_BETA) & \
            (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
        got = consistent_pixels(fwd, bwd)
        assert np.array_equal(got, constant) and 0.2 < got.mean() < 0.9
