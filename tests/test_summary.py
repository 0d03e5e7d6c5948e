"""Sweep summaries on a fake multirun dir: a 2x2 sweep plus one failed job (and one killed job)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenflow.cli.summarize import main
from tokenflow.evaluation.contact_sheets import _fit, contact_sheet, write_contact_sheets
from tokenflow.evaluation.plots import plot_metric, write_plots
from tokenflow.evaluation.sweep import load_sweep
from tokenflow.evaluation.tables import markdown, write_table
from tokenflow.runs.job_folder import write_job
from tokenflow.runs.outputs import read_native
from tokenflow.runs.overrides import override_line, parse_overrides
from conftest import translating_clip

STRENGTHS, PROPAGATORS = (0.5, 0.9), ("tokenflow", "none")


def warp(strength: float, propagator: str) -> float:
    return round(0.01 * strength + (0.003 if propagator == "none" else 0.0), 6)


def edit_of(clip: np.ndarray, strength: float, propagator: str) -> np.ndarray:
    shift = int(100 * strength) + (50 if propagator == "none" else 0)
    return ((clip.astype(int) + shift) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multirun")
    clip = translating_clip(n=3, h=64, w=64, shift=2)
    job = 0
    for s in STRENGTHS:
        for p in PROPAGATORS:
            ov = {"model": "tiny", "prompt": "a red fox", "editor.strength": s, "propagator": p}
            write_job(root / str(job), ov, config={"video": "sample", "prompt": "a red fox"},
                      metrics={"warp_error@opencv-farneback": warp(s, p), "unet_evaluations": 12 if p == "none" else 18,
                               "editing_s": 1.0 + s},
                      definitions={"warp_error@opencv-farneback": "flow-warping error"},
                      source=clip, edited=edit_of(clip, s, p), fps=8.0)
            job += 1
    write_job(root / "4", {"model": "tiny", "prompt": "a red fox", "editor.strength": 0.7, "propagator": "tokenflow"},
              config={"video": "sample"}, error="ConfigError: n_steps=0 must be >= 1 —\n use a positive number")
    (root / "5" / ".hydra").mkdir(parents=True)  # killed before writing anything but Hydra's overrides
    (root / "5" / ".hydra" / "overrides.yaml").write_text("- model=tiny\n- prompt=a\\ red\\ fox\n- editor.strength=0.1\n"
                                                          "- propagator=none\n")
    (root / "5" / ".hydra" / "config.yaml").write_text("video: sample\nn_steps: 2\n")  # Hydra's composed config
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_swept_parameters_and_rows(multirun: Path) -> None:
    sweep = load_sweep(multirun)
    assert [j.name for j in sweep.jobs] == ["0", "1", "2", "3", "4", "5"]
    assert sweep.swept == ["editor.strength", "propagator"]  # model and prompt are the same everywhere
    assert sweep.metrics == ["warp_error@opencv-farneback", "unet_evaluations", "editing_s"]
    assert [j.status for j in sweep.jobs] == ["ok"] * 4 + ["failed", "missing"]
    assert sweep.jobs[5].overrides["prompt"] == "a red fox"  # parsed from .hydra/overrides.yaml (escaped spaces)
    assert list(sweep.groups()) == ["sample"]


def test_csv_and_markdown(multirun: Path, tmp_path: Path) -> None:
    sweep = load_sweep(multirun)
    csv_path, md_path = write_table(sweep, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["job", "status", "editor.strength", "propagator", "warp_error@opencv-farneback",
                             "unet_evaluations", "editing_s", "error"]
    for row in rows[:4]:
        s, p = float(row["editor.strength"]), row["propagator"]
        assert float(row["warp_error@opencv-farneback"]) == warp(s, p)
        assert int(row["unet_evaluations"]) == (12 if p == "none" else 18) and row["error"] == ""
    failed = rows[4]
    assert failed["status"] == "failed" and failed["warp_error@opencv-farneback"] == ""
    assert failed["error"] == "ConfigError: n_steps=0 must be >= 1 — use a positive number"  # one line
    assert rows[5]["status"] == "missing" and "did not finish" in rows[5]["error"]
    md = md_path.read_text()
    assert md == markdown(sweep)
    assert "| 1 | ok | 0.5 | none | 0.008 | 12 | 1.5 |" in md
    assert "- job 4 (editor.strength=0.7, propagator=tokenflow): failed: ConfigError: n_steps=0 must be >= 1" in md
    assert "`warp_error@opencv-farneback`: flow-warping error" in md


def test_plots(multirun: Path, tmp_path: Path) -> None:
    sweep = load_sweep(multirun)
    fig = plot_metric(sweep, "warp_error@opencv-farneback", "editor.strength")
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines}
    assert lines == {f"propagator={p}": ([0.5, 0.9], [warp(0.5, p), warp(0.9, p)]) for p in PROPAGATORS}
    fig = plot_metric(sweep, "unet_evaluations", "propagator")  # categorical axis, one line per strength
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["tokenflow", "none"]
    assert [list(line.get_ydata()) for line in fig.axes[0].lines] == [[18, 12], [18, 12]]
    paths = write_plots(sweep, tmp_path)
    assert len(paths) == 3 * 2 and all(p.is_file() for p in paths)
    for path in paths:
        image = np.asarray(Image.open(path).convert("L"))
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 5  # drawn, not blank


def test_contact_sheet(multirun: Path, tmp_path: Path) -> None:
    sweep = load_sweep(multirun)
    sheet = contact_sheet(sweep, cell=64, n_frames=3)
    clip = read_native(multirun / "0" / "input.mp4").frames
    # 5 columns (input + 4 successful jobs) of 64 px; 3 rows of 64 px under one header of 3 label lines
    header = 3 * 11 + 4
    assert sheet.shape == (header + 3 * 64, 5 * 64, 3)
    np.testing.assert_array_equal(sheet[header + 64:header + 128, 64:128],  # job 0, frame 1
                                  _fit(read_native(multirun / "0" / "frames" if (multirun / "0" / "frames").is_dir()
                                                   else multirun / "0" / "edited.mp4").frames[1], (64, 64)))
    assert np.abs(sheet[header + 20:header + 44, 20:44].astype(int) - clip[0, 20:44, 20:44]).mean() < 10  # input, t=0
    paths = write_contact_sheets(sweep, tmp_path, cell=64, n_frames=3)
    assert [p.name for p in paths] == ["contact_sample.png", "contact_sample.mp4"]
    video = read_native(paths[1])
    assert video.n_frames == 3 and video.fps == 8.0 and video.width == 4 * 64  # 4 columns, then a second row
    assert np.asarray(Image.open(paths[0])).shape == sheet.shape


def test_dataset_sweep_groups_by_video(tmp_path: Path) -> None:
    for i, (video, s) in enumerate([("a.mp4", 0.5), ("a.mp4", 0.9), ("b.mp4", 0.5), ("b.mp4", 0.9)]):
        clip = translating_clip(n=2, h=64, w=64, seed=ord(video[0]))
        write_job(tmp_path / str(i), {"video": video, "editor.strength": s}, config={"video": video},
                  metrics={"warp_error@opencv-farneback": s}, source=clip, edited=clip, fps=5.0)
    sweep = load_sweep(tmp_path)
    assert sweep.swept == ["video", "editor.strength"]
    assert {g: [j.name for j in jobs] for g, jobs in sweep.groups().items()} == {"a.mp4": ["0", "1"], "b.mp4": ["2", "3"]}
    paths = write_contact_sheets(sweep, tmp_path / "out", cell=64, video=False)
    assert [p.name for p in paths] == ["contact_a.png", "contact_b.png"]
    assert "video=" not in sweep.label(sweep.jobs[0])  # the grouping key is not repeated in the labels


def test_legacy_flat_metrics_json(tmp_path: Path) -> None:
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- n_steps=2\n")
    (job / "metrics.json").write_text(json.dumps({"editing_s": 0.5, "unet_evaluations": 4, "n_frames": 2,
                                                  "model": "tiny:x", "keyframes": [[1]]}))
    sweep = load_sweep(tmp_path)
    assert sweep.jobs[0].ok and sweep.metrics == ["editing_s", "unet_evaluations"]
    assert sweep.jobs[0].record["info"]["model"] == "tiny:x"


def test_overrides_round_trip() -> None:
    values = {"prompt": "a fox's tail, | blue", "editor.strength": 0.85, "n_steps": 2, "use_cache": False,
              "keyframes.indices": [0, 4], "negative_prompt": None, "video": "data/wolf.mp4"}
    assert parse_overrides([override_line(k, v) for k, v in values.items()]) == values
    assert parse_overrides(["+editor.extra=3", "~search"]) == {"editor.extra": 3, "search": None}


def test_console_entry(multirun: Path, tmp_path: Path, capsys) -> None:
    assert main([str(multirun), "--out", str(tmp_path / "s"), "--cell", "64", "--no-video"]) == 0
    assert "6 jobs (2 failed), swept: editor.strength, propagator" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"summary.csv", "summary.md", "plots", "contact_sample.png"}
    assert main([str(tmp_path / "nothing-here")]) == 2
