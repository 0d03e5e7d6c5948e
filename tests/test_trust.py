"""Data files never run code: dataset manifests and received run folders are read as data.

A manifest may set only what the README documents for items (video, prompts, inversion prompt, size,
frames, name) and ``root``; anything else, a ``_target_`` anywhere or an interpolation (resolvers have
side effects), is refused in one line naming the key before any job starts. ``tokenflow-metrics`` on a
run folder rebuilds the metrics from the library's own registry by name, never from ``_target_``s in the
folder's config.yaml. Each "payload" here would create a folder if it were ever instantiated or resolved.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_robustness import TINY, assert_one_line, cli


def _payload(where: Path) -> dict:
    return {"_target_": "os.makedirs", "name": str(where)}


def _manifest(**extra) -> dict:
    return {"items": [{"video": "sample", "prompts": ["a fox"], "frames": 2, "size": [64, 64]}], **extra}


def _write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


MANIFESTS = {  # id -> (manifest given the payload's folder, part of the refusal)
    "editor-target-beside-items": (lambda p: _manifest(editor=_payload(p)), "'editor'"),
    "editor-target-beside-dataset": (lambda p: {"dataset": _manifest(), "editor": _payload(p)}, "'editor'"),
    "hydra-callback": (lambda p: {"dataset": _manifest(), "hydra": {"callbacks": {"x": _payload(p)}}}, "hydra"),
    "target-inside-item": (lambda p: _manifest(items=[{"video": "sample", "prompts": ["a"], "name": _payload(p)}]),
                           "items[0].name"),
    "interpolation-in-video": (lambda p: _manifest(items=[{"video": "${tokenflow.claim:" + str(p) + "}",
                                                           "prompts": ["a"]}]), "interpolation"),
    "interpolation-in-root": (lambda p: {**_manifest(), "root": "${tokenflow.claim:" + str(p) + "}"}, "interpolation"),
    "defaults-list": (lambda p: {"defaults": [{"editor": "sdedit"}], **_manifest()}, "'defaults'"),
}


@pytest.mark.parametrize("case", list(MANIFESTS), ids=list(MANIFESTS))
def test_a_manifest_sets_only_item_keys(case, tmp_path, cache_dir, capfd, monkeypatch):
    build, message = MANIFESTS[case]
    pwned = tmp_path / "pwned"
    manifest = _write(tmp_path / "manifest.yaml", build(pwned))
    code, out, err = cli(["-m", f"dataset={manifest}", *TINY], tmp_path, cache_dir, capfd, monkeypatch)
    line = assert_one_line(code, err, message)
    assert "dataset" in line and not pwned.exists()
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.mp4"))  # refused before any job


def test_a_manifest_with_the_documented_sweep_block_still_runs(tmp_path, cache_dir, capfd, monkeypatch):
    """The shape conf/dataset/davis_sample.yaml documents (`dataset:` plus its `hydra.sweeper` block) is data."""
    from tokenflow.cli.dataset import SWEEP

    manifest = _write(tmp_path / "manifest.yaml", {"dataset": _manifest(), "hydra": SWEEP})
    code, out, err = cli(["-m", f"dataset={manifest}", *TINY], tmp_path, cache_dir, capfd, monkeypatch)
    assert code == 0, err[-3000:]
    (record,) = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert record["status"] == "ok" and record["overrides"]["prompt"] == "a fox"


def _run_folder(folder: Path, metrics_node: dict) -> Path:
    """A finished run folder as tokenflow-edit leaves it (2 frames), with ``metrics_node`` in its config.yaml."""
    from tokenflow.storage.mp4 import write_video
    from tokenflow.storage.png import write_frames

    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    folder.mkdir()
    write_video(folder / "input.mp4", frames, 10.0)
    write_frames(folder / "frames", frames)
    (folder / "config.yaml").write_text(yaml.safe_dump({"prompt": "a fox", "device": "cpu", "metrics": metrics_node}))
    (folder / "metrics.json").write_text(json.dumps({"status": "ok", "error": None, "task": "edit", "overrides": {},
                                                     "metrics": {}, "definitions": {}, "info": {}}))
    return folder


def _rescore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from tokenflow.cli.metrics import main; "
                           "sys.exit(main())", *args], capture_output=True, text=True, timeout=300)


RUN_CONFIGS = {  # id -> (metrics node of a received run's config.yaml, part of the refusal)
    "metric-target": (lambda p: {"_target_": "tokenflow.evaluation.interface.MetricSuite", "warp": _payload(p)},
                      "metrics.warp"),
    "suite-target": (lambda p: _payload(p), "metrics"),
    "nested-target": (lambda p: {"_target_": "tokenflow.evaluation.interface.MetricSuite",
                                 "warp": {"_target_": "tokenflow.evaluation.weight_free.WarpErrorMetric",
                                          "method": _payload(p)}}, "metrics.warp.method"),
    "resolver": (lambda p: {"_target_": "tokenflow.evaluation.interface.MetricSuite",
                            "warp": {"_target_": "tokenflow.evaluation.weight_free.WarpErrorMetric",
                                     "method": "${tokenflow.claim:" + str(p) + "}"}}, "interpolation"),
}


@pytest.mark.parametrize("case", list(RUN_CONFIGS), ids=list(RUN_CONFIGS))
def test_rescoring_a_run_folder_never_instantiates_its_targets(case, tmp_path):
    build, message = RUN_CONFIGS[case]
    pwned = tmp_path / "pwned"
    run = _run_folder(tmp_path / "run", build(pwned))
    before = (run / "metrics.json").read_text()
    result = _rescore(str(run))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and " — " in lines[0], result.stderr[-3000:]
    assert not pwned.exists() and (run / "metrics.json").read_text() == before


def test_rescoring_rebuilds_the_runs_own_metrics_by_name(tmp_path):
    """A legitimate run folder is rescored with its own (registered) metrics and settings."""
    run = _run_folder(tmp_path / "run", {"_target_": "tokenflow.evaluation.interface.MetricSuite",
                                         "warp": {"_target_": "tokenflow.evaluation.weight_free.WarpErrorMetric",
                                                  "method": "dis"}})
    result = _rescore(str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    assert record["info"]["recomputed_metrics"][0] == "warp_error@opencv-dis"
    assert all(k.endswith("@opencv-dis") for k in record["info"]["recomputed_metrics"])


def test_the_metric_registry_names_every_shipped_metric():
    """Every `_target_` of conf/metrics/*.yaml is in the registry the run folders are rebuilt from."""
    from importlib import resources

    from tokenflow.evaluation.interface import MetricSuite
    from tokenflow.evaluation.suites import METRIC_CLASSES

    targets = set()
    for path in (resources.files("tokenflow.conf") / "metrics").iterdir():
        node = yaml.safe_load(path.read_text()) or {}
        targets |= {v["_target_"] for v in node.values() if isinstance(v, dict)}
    names = {f"{c.__module__}.{c.__qualname__}" for c in METRIC_CLASSES.values()}
    assert targets and targets <= names and MetricSuite not in METRIC_CLASSES.values()


def test_library_error_finds_ours_in_a_wrapped_chain_and_stops_on_cycles():
    from tokenflow.errors import ConfigError, chained, library_error

    ours = ConfigError("editor.x=1 must be 2 — use 2")
    try:
        try:
            raise ours
        except ConfigError as e:
            raise RuntimeError("Error in call to target 'X'") from e  # as Hydra's instantiate wraps it
    except RuntimeError as wrapped:
        assert library_error(wrapped) is ours and list(chained(wrapped))[-1] is ours
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert library_error(a) is None and len(list(chained(a))) == 2


@pytest.mark.parametrize("editor, key", [("PnPEditor", "pnp_f_t"), ("PnPEditor", "pnp_attn_t"), ("SDEditEditor", "strength"),
                                         ("KVInjectionEditor", "inject_t"), ("PromptToPromptEditor", "self_replace_steps")])
def test_editors_refuse_fractions_outside_the_unit_interval_in_one_line(editor, key):
    import tokenflow.editors as editors
    from tokenflow.errors import ConfigError

    cls = getattr(editors, editor)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match=rf"editor\.{key}=.* must be in \[0, 1\]"):
            cls(**{key: bad})
    for bad, says in ((-1.0, "must be >= 0"), (float("inf"), "is not a finite number"),
                      (float("nan"), "is not a finite number")):
        with pytest.raises(ConfigError, match=rf"editor\.guidance_scale=\S+ {says}"):
            cls(guidance_scale=bad)
