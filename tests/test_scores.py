"""The metric interface: config-built suites, known answers on synthetic clips, tiny CLIP/DINO against
transformers' own forward pass, recomputing a finished run's metrics.json."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.cli.metrics import main
from tokenflow.evaluation.benchmarks import BENCHMARKS
from tokenflow.evaluation.interface import MetricSuite, VideoMetric
from tokenflow.evaluation.model_metrics import MEANINGLESS, ClipMetric, DinoStructureMetric, key_projections
from tokenflow.evaluation.recompute import recompute
from tokenflow.evaluation.suites import build_suite
from tokenflow.evaluation.weight_free import BackgroundMetric, TrackMetric, WarpErrorMetric
from tokenflow.runs.job_folder import write_job
from tokenflow.runs.outputs import read_native
from tokenflow.runs.pipeline_metrics import PIPELINE_METRICS, pipeline_definitions
from tokenflow.models.tiny_eval import MARKER, TinyDinoSpec, tiny_dino_folder
from conftest import translating_clip

CONF = Path(__file__).resolve().parents[1] / "conf" / "metrics"
AUXILIARY = {"warp_occluded_fraction", "track_kept_fraction"}  # companions of a benchmarked key


@pytest.fixture(scope="module")
def clip4() -> np.ndarray:
    return translating_clip(n=4, h=64, w=64, shift=2)


@pytest.fixture(scope="module")
def clip_metric(cache_dir) -> ClipMetric:
    return ClipMetric(model="tiny", device="cpu", cache_dir=str(cache_dir))


@pytest.fixture(scope="module", params=["dinov2", "vit"])
def dino_metric(request, cache_dir) -> DinoStructureMetric:
    folder = tiny_dino_folder(cache_dir, TinyDinoSpec(kind=request.param))
    return DinoStructureMetric(model=str(folder), device="cpu", size=32)


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_metrics_config_builds_without_loading_a_model(option: str) -> None:
    suite = build_suite(option)
    assert isinstance(suite, MetricSuite) and all(isinstance(m, VideoMetric) for m in suite.metrics.values())
    for name, metric in suite.metrics.items():
        assert name == metric.name
        assert "_loaded" not in vars(metric)  # model-based metrics load on first use, not when built
        assert metric.definitions and all(isinstance(v, str) and len(v) > 40 for v in metric.definitions.values())
        for key in metric.definitions:
            assert key.split("@")[0] in BENCHMARKS or key.split("@")[0] in AUXILIARY, key


def test_suite_overrides_and_errors() -> None:
    suite = build_suite("default", ["warp.method=dis", "~tracks"])
    assert suite.metrics["warp"].config.method == "dis" and list(suite.metrics) == ["warp", "background"]
    assert "warp_error@opencv-dis" in suite.definitions()
    with pytest.raises(ConfigError, match="metrics.warp has no setting 'radius'"):
        build_suite("default", ["+warp.radius=3"])
    with pytest.raises(ConfigError, match="metrics.warp.method='raft' is unknown"):
        build_suite("default", ["warp.method=raft"])
    with pytest.raises(ConfigError, match="is neither a YAML file nor one of default"):
        build_suite("nonexistent")
    with pytest.raises(ConfigError, match="not a VideoMetric"):
        MetricSuite(warp=3)
    with pytest.raises(ModelLoadError, match="does not exist"):
        ClipMetric(model="./no/such/clip", device="cpu").compute(np.zeros((2, 64, 64, 3), np.uint8),
                                                                 np.zeros((2, 64, 64, 3), np.uint8), "x")
    resolved = build_suite("full", context={"device": "cpu"})
    assert resolved.metrics["clip"].config.device == "cpu" and resolved.metrics["dino"].config.device == "cpu"


def test_pipeline_metrics_are_listed_not_computed() -> None:
    assert {"inversion_s", "editing_s", "unet_evaluations", "peak_rss_mb", "psnr_reconstruction_vs_input"} <= set(PIPELINE_METRICS)
    assert pipeline_definitions({"editing_s": 1.0, "warp_error@opencv-farneback": 0.1}) == {"editing_s": PIPELINE_METRICS["editing_s"]}


# --- weight-free metrics through the interface ----------------------------------------------------


def test_warp_and_track_metrics_known_answers(clip4: np.ndarray) -> None:
    static = np.repeat(clip4[:1], 4, axis=0)
    warp, tracks = WarpErrorMetric(), TrackMetric()
    assert warp.compute(static, static)["warp_error@opencv-farneback"] < 1e-6
    moving = warp.compute(translating_clip(n=4, h=64, w=64, shift=2, seed=3), clip4)["warp_error@opencv-farneback"]
    flicker = clip4.astype(float) * np.array([1.0, 0.7, 1.2, 0.8])[:, None, None, None]
    flickering = warp.compute(np.clip(flicker, 0, 255).astype(np.uint8), clip4)["warp_error@opencv-farneback"]
    assert moving < 1e-3 and flickering > 10 * moving
    assert tracks.compute(clip4, clip4) == {"track_epe@opencv-lk": 0.0, "track_kept_fraction@opencv-lk": 1.0}
    assert tracks.compute(static, clip4)["track_epe@opencv-lk"] > 1.0
    # one frame: nothing temporal to measure
    assert warp.compute(clip4[:1], clip4[:1]) == {} and tracks.compute(clip4[:1], clip4[:1]) == {}


def test_background_metric_needs_masks_and_ignores_the_object(clip4: np.ndarray) -> None:
    metric = BackgroundMetric()
    assert metric.compute(clip4, clip4) == {}
    mask = np.zeros(clip4.shape[:3], bool)
    mask[:, 16:40, 16:40] = True
    edited = clip4.copy()
    edited[mask] = 0  # the object was replaced, the background kept
    out = metric.compute(edited, clip4, masks=mask)
    assert out == {"background_psnr": math.inf, "background_ssim": 1.0}
    noisy = np.clip(edited.astype(int) + np.random.default_rng(0).integers(-9, 10, edited.shape), 0, 255).astype(np.uint8)
    assert metric.compute(noisy, clip4, masks=mask)["background_psnr"] < 40


# --- tiny CLIP -----------------------------------------------------------------------------------


def test_clip_consistency_of_identical_frames_is_exactly_one(cache_dir, clip_metric: ClipMetric,
                                                            clip4: np.ndarray) -> None:
    same = np.repeat(clip4[1:2], 3, axis=0)
    one_by_one = ClipMetric(model="tiny", device="cpu", cache_dir=str(cache_dir), batch_size=1)
    out = one_by_one.compute(same, same, prompt="")
    assert out["clip_frame_consistency@tiny-random"] == 1.0
    assert out["clip_frame_consistency_first@tiny-random"] == 1.0
    assert out["clip_frame_consistency_all_pairs@tiny-random"] == 1.0
    assert "clip_text_alignment@tiny-random" not in out  # no prompt, no text alignment
    # in one batch, rows of identical frames differ by float32 rounding (measured 1 - 8.5e-15)
    batched = clip_metric.compute(same, same, prompt="")
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in batched.values())


def test_clip_scores_against_the_clip_forward_pass(clip_metric: ClipMetric, clip4: np.ndarray) -> None:
    """Oracle: CLIPModel's own forward (normalised image/text embeddings, logits = scale * cosine)."""
    model, tokenizer, processor, _ = clip_metric._loaded
    a, b = clip4[0], np.ascontiguousarray(clip4[3, :, ::-1])
    frames = np.stack([a, b, a])
    prompt = "a red fox in the snow"
    with torch.no_grad():
        inputs = tokenizer([prompt], return_tensors="pt")
        pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        ref = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels)
    text_cos = (ref.logits_per_image[:, 0] / model.logit_scale.exp()).double().numpy()
    img = ref.image_embeds.double().numpy()
    c = float(img[0] @ img[1] / np.linalg.norm(img[0]) / np.linalg.norm(img[1]))
    out = clip_metric.compute(frames, frames, prompt)
    assert out["clip_text_alignment@tiny-random"] == pytest.approx(text_cos.mean(), abs=1e-6)
    assert out["clip_frame_consistency@tiny-random"] == pytest.approx(c, abs=1e-6)           # (a,b), (b,a)
    assert out["clip_frame_consistency_first@tiny-random"] == pytest.approx((c + 1) / 2, abs=1e-6)
    assert out["clip_frame_consistency_all_pairs@tiny-random"] == pytest.approx((4 * c + 2) / 6, abs=1e-6)
    assert c < 0.9999  # the frames do differ


def test_tiny_scores_are_marked_meaningless(cache_dir, clip4: np.ndarray) -> None:
    suite = build_suite("tiny", ["dino.size=32"], context={"device": "cpu", "cache_dir": str(cache_dir)})
    scores = suite.evaluate(clip4, clip4, "a fox")
    tiny = [k for k in scores.values if k.endswith("@tiny-random")]
    assert len(tiny) == 6 and sorted(scores.meaningless) == sorted(tiny)
    assert all(scores.definitions[k].startswith(MEANINGLESS) for k in tiny)
    assert not any(scores.definitions[k].startswith(MEANINGLESS) for k in scores.values if k not in tiny)
    record = scores.merge_into({"metrics": {"unet_evaluations": 12}, "info": {"n_frames": 4}})
    assert record["metrics"]["unet_evaluations"] == 12 and record["info"]["n_frames"] == 4
    assert record["info"]["meaningless_metrics"] == sorted(tiny)
    assert (Path(cache_dir) / "models").is_dir() and any((p / MARKER).is_file() for p in (Path(cache_dir) / "models").iterdir())


# --- tiny DINO ------------------------------------------------------------------------------------


def test_structure_distance_of_a_frame_against_itself_is_zero(dino_metric: DinoStructureMetric, clip4: np.ndarray) -> None:
    out = dino_metric.compute(clip4, clip4)
    assert out["structure_distance@tiny-random"] == 0.0
    assert out["dino_consistency@tiny-random"] > 0.0
    same = np.repeat(clip4[:1], 3, axis=0)
    assert dino_metric.compute(same, same)["dino_consistency@tiny-random"] == pytest.approx(1.0, abs=1e-12)


def test_structure_distance_against_keys_computed_by_hand(dino_metric: DinoStructureMetric, clip4: np.ndarray) -> None:
    """Oracle: the layer's input from output_hidden_states, its pre-attention LayerNorm and key Linear by hand."""
    model = dino_metric._loaded[0]
    other = np.ascontiguousarray(clip4[:, ::-1])
    k_proj = key_projections(model)[-1]
    name = next(n for n, m in model.named_modules() if m is k_proj)
    layer = model.get_submodule(name.rsplit(".attention", 1)[0])
    norm = next(m for m in layer.children() if isinstance(m, torch.nn.LayerNorm))

    def sim(frames):
        with torch.no_grad():
            hidden = model(pixel_values=dino_metric.pixels(frames), output_hidden_states=True).hidden_states
            keys = k_proj(norm(hidden[len(hidden) - 2])).double()
        keys = keys / keys.norm(dim=-1, keepdim=True)
        return keys @ keys.transpose(1, 2)

    expected = ((sim(other) - sim(clip4)) ** 2).mean().item()
    got = dino_metric.compute(other, clip4)["structure_distance@tiny-random"]
    assert got == pytest.approx(expected, rel=1e-9) and got > 0
    n_tokens = dino_metric.features(clip4[:1])[0].shape[1]
    assert n_tokens == 1 + (32 // 8) ** 2  # CLS + 4x4 patches at size 32


# --- recompute ------------------------------------------------------------------------------------


def test_recompute_updates_metrics_json_atomically(tmp_path: Path, clip4: np.ndarray, capsys, failing_half_way) -> None:
    edited = np.clip(clip4.astype(int) + np.array([0, 40, -30, 20])[:, None, None, None], 0, 255).astype(np.uint8)
    run = write_job(tmp_path / "multirun" / "0", {"prompt": "a fox", "editor.strength": 0.5},
                    config={"prompt": "a fox", "device": "cpu"}, metrics={"unet_evaluations": 12, "editing_s": 1.5},
                    definitions={"editing_s": "seconds"}, source=clip4, edited=edited, fps=10.0)
    write_job(tmp_path / "multirun" / "1", {"prompt": "a fox", "editor.strength": 0.9}, error="CUDA out of memory")
    mask = np.zeros(clip4.shape[:3], bool)
    mask[:, 20:40, 20:40] = True
    record = recompute(run, "default", masks=mask)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["metrics"]["unet_evaluations"] == 12 and on_disk["overrides"]["editor.strength"] == 0.5
    expected = build_suite("default").evaluate(read_native(run / "edited.mp4"), read_native(run / "input.mp4"),
                                               "a fox", mask)
    for key, value in expected.values.items():
        assert on_disk["metrics"][key] == value and on_disk["definitions"][key] == expected.definitions[key]
    assert {"warp_error@opencv-farneback", "track_epe@opencv-lk", "background_psnr"} <= set(on_disk["metrics"])
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    # a rescoring whose write fails half-way (a full disk) leaves the run's record as it was, whole
    before = (run / "metrics.json").read_bytes()
    with failing_half_way():
        with pytest.raises(OSError):
            recompute(run, "default", masks=mask)
    assert (run / "metrics.json").read_bytes() == before and not [p for p in run.iterdir() if ".tmp-" in p.name]
    # the console entry scores every job of a multirun dir, reports the failed one, and exits non-zero for it
    assert main([str(tmp_path / "multirun"), "--metrics", "default", "warp.method=dis"]) == 2
    captured = capsys.readouterr()
    assert "warp_error@opencv-dis=" in captured.out and "CUDA out of memory" in captured.err
    assert "warp_error@opencv-dis" in json.loads((run / "metrics.json").read_text())["metrics"]
    assert main([str(tmp_path / "no-such-dir")]) == 2 and "not a directory" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="CUDA out of memory"):
        recompute(tmp_path / "multirun" / "1")


def test_recompute_uses_the_runs_own_metrics_config_and_mask_files(tmp_path: Path, clip4: np.ndarray) -> None:
    from tokenflow.storage.png import write_frames

    own = {"_target_": "tokenflow.evaluation.interface.MetricSuite",
           "warp": {"_target_": "tokenflow.evaluation.weight_free.WarpErrorMetric", "method": "dis"},
           "background": {"_target_": "tokenflow.evaluation.weight_free.BackgroundMetric"}}
    edited = clip4.copy()
    edited[:, 8:24, 8:24] = 255 - edited[:, 8:24, 8:24]
    run = write_job(tmp_path / "run", {}, config={"metrics": own, "prompt": ""}, source=clip4, edited=edited)
    mask = np.zeros(clip4.shape[:3], bool)
    mask[:, 4:28, 4:28] = True
    write_frames(tmp_path / "masks", np.repeat(mask[..., None] * np.uint8(255), 3, axis=-1))
    from_files = recompute(run, masks=tmp_path / "masks")["metrics"]
    assert set(from_files) == {"warp_error@opencv-dis", "warp_occluded_fraction@opencv-dis", "background_psnr",
                               "background_ssim"}
    assert from_files == recompute(run, masks=mask)["metrics"]
