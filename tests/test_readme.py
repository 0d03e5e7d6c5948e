"""The README's set-up contract: its first command runs the main job on a fresh machine.

The command is parsed from the README (the first line of its first ``bash`` block), not copied here.
Its install step is checked for what a fresh clone needs; the rest runs as written on the installed
package, in an empty folder with nothing beside it (no ``../shared``), and its output is checked.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    """The command lines of the README's first ``bash`` block (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the README has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_has_the_two_setup_commands():
    install_and_run, tests = readme_commands()[:2]
    steps = [s.strip() for s in install_and_run.split("&&")]
    assert any(s.startswith("pip install -e") and "-c requirements/ci-constraints.txt" in s for s in steps), steps
    assert steps[-1].startswith("tokenflow-edit ")
    assert "../shared" not in install_and_run, "the first command must run on a clone with nothing beside it"
    assert "pytest" in tests


def test_first_command_runs_the_main_job_in_an_empty_folder(tmp_path, cache_dir):
    if not (BIN / "tokenflow-edit").exists():
        pytest.skip("tokenflow-edit is not installed in this environment (pip install -e .)")
    steps = [s.strip() for s in readme_commands()[0].split("&&")]
    run_steps = [s for s in steps if not s.startswith(("python3 -m venv", ". ", "source ", "pip install"))]
    assert run_steps and all(shlex.split(s)[0] == "tokenflow-edit" for s in run_steps), run_steps
    work = tmp_path / "fresh"  # an empty folder: no ../shared beside it, no ./conf
    work.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TOKENFLOW_CACHE": str(cache_dir),
           "HF_HUB_OFFLINE": "1"}
    shell = subprocess.Popen(" && ".join(run_steps), shell=True, cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = shell.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)  # the shell and the command it started, not only the shell
        stdout, stderr = shell.communicate()
        pytest.fail(f"the README's first command ran past 600 s: {stderr[-2000:]}")
    result = subprocess.CompletedProcess(shell.args, shell.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded sample clip" in result.stdout
    runs = sorted(work.glob("outputs/edit/*/*/edited.mp4"))
    assert len(runs) == 1, runs
    from tokenflow.storage.video import read_video

    edited = read_video(runs[0], short_side=128)
    assert edited.frames.shape == (16, 128, 128, 3)
    assert edited.frames.std() > 1.0  # decoded pictures, not a blank video
    assert len(list(runs[0].parent.glob("frames/*.png"))) == 16


def test_missing_video_is_one_line_naming_the_key(tmp_path, cache_dir):
    exe = BIN / "tokenflow-edit"
    if not exe.exists():
        pytest.skip("tokenflow-edit is not installed in this environment (pip install -e .)")
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(exe), "model=tiny", "video=???", "prompt=a fox"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "video is not set" in errors[0] and "video=sample" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
