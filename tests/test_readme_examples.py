"""The README's "Writing your own" examples run as written (parsed from the README, not copied here).

Each ```python block after an ``<!-- example: name -->`` marker is executed in a fresh namespace, from an
empty folder, on the tiny model (built under the test cache dir); the objects it leaves behind are then
checked: a broken interface, a README drifting from the code, or an example that does nothing fails.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_examples() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    return dict(re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", text, re.S))


def run_example(name: str, tmp_path, monkeypatch, cache_dir) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENFLOW_CACHE", str(cache_dir))
    source = readme_examples()[name]
    namespace: dict = {"__name__": f"readme_example_{name}"}
    exec(compile(source, f"README.md:<example {name}>", "exec"), namespace)
    return namespace


def test_the_readme_has_its_examples():
    assert set(readme_examples()) == {"editor", "propagator", "controlnet", "torchrun"}


def _check_result(ns: dict, n_frames: int = 8) -> None:
    result, video = ns["result"], ns["video"]
    assert result.frames.shape == (n_frames, 64, 64, 3) and result.frames.dtype.name == "uint8"
    assert torch.isfinite(result.latents).all()
    assert video.n_frames == n_frames


def test_editor_example(tmp_path, monkeypatch, cache_dir):
    ns = run_example("editor", tmp_path, monkeypatch, cache_dir)
    _check_result(ns)
    # keyframe pass + the other frames, each x (source for correspondences + uncond + cond), 3 steps
    assert ns["result"].unet_evaluations == 3 * 3 * 8


def test_propagator_example_is_called_and_shapes_the_edit(tmp_path, monkeypatch, cache_dir):
    """The example's propagator answers every propagate query; its edit differs from TokenFlow's own."""
    ns = run_example("propagator", tmp_path, monkeypatch, cache_dir)
    _check_result(ns)
    calls = []
    original = ns["NearestKeyframe"].propagate

    def counted(self, query):
        out = original(self, query)
        calls.append((query.frames.tolist(), query.keyframes.tolist()))
        assert out.shape[:2] == (query.keyframe_outputs.shape[0], len(query.frames))
        return out

    ns["NearestKeyframe"].propagate = counted
    from tokenflow import TokenFlowPropagator

    again = ns["pipe"](ns["video"], prompt="a robotic wolf", inversion_prompt="a wolf", progress=False)
    assert calls and torch.equal(again.latents, ns["result"].latents)  # deterministic, and really the propagator's
    pipe = ns["pipe"]
    tokenflow = type(pipe)(pipe.model, ns["PnPEditor"](), TokenFlowPropagator(), ns["RandomKeyframes"](stride=4, seed=0),
                           n_steps=3)
    reference = tokenflow(ns["video"], prompt="a robotic wolf", inversion_prompt="a wolf", progress=False)
    assert not torch.equal(reference.latents, ns["result"].latents)


def test_controlnet_example_changes_only_what_the_controlnet_adds(tmp_path, monkeypatch, cache_dir):
    """The example's ControlNet residuals reach the UNet (the edit moves), and at scale 0 it equals plain CFG."""
    ns = run_example("controlnet", tmp_path, monkeypatch, cache_dir)
    _check_result(ns)
    from tokenflow import GuidedEditor

    class PlainCFG(GuidedEditor):
        guidance_scale = 7.5

    pipe = ns["pipe"]
    keyframes = ns["RandomKeyframes"](stride=4, seed=0)
    args = dict(prompt="a robotic wolf", inversion_prompt="a wolf", progress=False)
    plain = type(pipe)(pipe.model, PlainCFG(), ns["TokenFlowPropagator"](), keyframes, n_steps=3)(ns["video"], **args)
    off = type(pipe)(pipe.model, ns["CannyControlled"](ns["controlnet"], scale=0.0), ns["TokenFlowPropagator"](),
                     keyframes, n_steps=3)(ns["video"], **args)
    assert torch.allclose(off.latents, plain.latents, atol=1e-5)
    gap = float((ns["result"].latents - plain.latents).norm() / plain.latents.norm())
    assert gap > 1e-3, gap


def test_torchrun_example_equals_one_process(tmp_path, cache_dir):
    """The README's script under ``torchrun --nproc-per-node 2`` (gloo) writes the video one process writes."""
    import os
    import subprocess
    import sys

    from tokenflow.storage.video import read_video

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "torchrun").exists():
        pytest.skip("torchrun is not installed beside this Python")
    script = tmp_path / "edit_video.py"
    script.write_text(readme_examples()["torchrun"])
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outputs = {}
    for name, command in {"single": [sys.executable, str(script)],
                          "two": [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2",
                                  str(script)]}.items():
        work = tmp_path / name
        work.mkdir()
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = read_video(work / "edited.mp4", height=64, width=64).frames
    assert outputs["single"].shape == (8, 64, 64, 3)
    assert (outputs["single"] == outputs["two"]).all()
