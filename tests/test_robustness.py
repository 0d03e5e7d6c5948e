"""Hostile input: bad files, impossible sizes, broken configs, full and unwritable disks, kills, concurrent runs.

Every user error must be exactly one ``error:`` line on stderr (nothing else there: no traceback, no
decoder chatter), exit status 2, and leave no output under a final name. Most cases fail before any
model work; the few that need one run the tiny model on 2 frames at 64x64 with 2 steps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
TINY = ["model=tiny", "n_frames=2", "height=64", "width=64", "n_steps=2", "progress=false", "metrics=none"]


# ---- the files --------------------------------------------------------------------------------------
def _ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad (and a few good) inputs, made here so the suite needs nothing from outside."""
    from PIL import Image

    from tokenflow.storage.mp4 import write_video

    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    f = {name: d / name for name in ("ok.mp4", "empty.mp4", "text.mp4", "audio.m4a", "cut_data.mp4", "cut_header.mp4",
                                     "image.png", "no_images", "corrupt_frames", "thin.mp4", "odd.mp4", "big.mp4")}
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10", "-t", "1", "-pix_fmt", "yuv420p", "-c:v", "libx264",
            "-movflags", "+faststart", str(f["ok.mp4"]))
    f["empty.mp4"].write_bytes(b"")
    f["text.mp4"].write_text("this is not a video\n" * 20)
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", str(f["audio.m4a"]))
    data = f["ok.mp4"].read_bytes()
    f["cut_data.mp4"].write_bytes(data[: len(data) * 6 // 10])  # index intact (faststart), frames' data cut
    f["cut_header.mp4"].write_bytes(data[len(data) // 3:])        # no header at all
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(f["image.png"])
    f["no_images"].mkdir()
    (f["no_images"] / "notes.txt").write_text("no frames here")
    f["corrupt_frames"].mkdir()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(f["corrupt_frames"] / "00000.png")
    (f["corrupt_frames"] / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    write_video(f["thin.mp4"], rng.integers(0, 255, (2, 32, 2000, 3), dtype=np.uint8), 10.0)
    write_video(f["odd.mp4"], rng.integers(0, 255, (3, 64, 96, 3), dtype=np.uint8), 10.0)
    write_video(f["big.mp4"], rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8), 10.0)
    return f


# ---- the console script, in this process (fast) or as a subprocess (exit codes, kills, concurrency) -----
def cli(args: list[str], cwd: Path, cache: Path, capfd, monkeypatch, script: str = "edit") -> tuple[int, str, str]:
    """Run ``tokenflow-<script> args`` in-process from ``cwd``; returns (exit status, stdout, stderr)."""
    from tokenflow.cli.main import edit_main, invert_main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TOKENFLOW_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [f"tokenflow-{script}", *args])
    capfd.readouterr()
    try:
        (edit_main if script == "edit" else invert_main)()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, message: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]  # nothing else on stderr
    assert message in lines[0], lines[0]
    assert " — " in lines[0], f"no fix named: {lines[0]}"
    print(lines[0])  # shown with pytest -rP
    return lines[0]


BAD_INPUTS = [  # (id, arguments (FILE:name is a file of the fixture), expected part of the line)
    ("missing-file", ["video=/no/such/clip.mp4"], "video not found: '/no/such/clip.mp4'"),
    ("empty-file", ["video=FILE:empty.mp4"], "is empty (0 bytes)"),
    ("text-file", ["video=FILE:text.mp4"], "is not a readable video"),
    ("audio-only", ["video=FILE:audio.m4a"], "has no video stream (audio streams only)"),
    ("truncated-data", ["video=FILE:cut_data.mp4", "n_frames=2"], "cut_data.mp4"),
    ("truncated-header", ["video=FILE:cut_header.mp4"], "is not a readable video"),
    ("image-not-clip", ["video=FILE:image.png", "n_frames=2"], "has 1 frames; n_frames=2"),
    ("folder-no-images", ["video=FILE:no_images"], "no frames in folder"),
    ("folder-corrupt-frame", ["video=FILE:corrupt_frames"], "00001.png"),
    ("too-many-frames", ["video=FILE:odd.mp4", "n_frames=5"], "has 3 frames; n_frames=5"),
    ("stride-past-end", ["video=FILE:odd.mp4", "n_frames=2", "frame_stride=3"], "n_frames=2 with frame_stride 3 needs 4"),
    ("video-unset", ["video=???"], "video is not set"),
    ("height-not-64", ["height=100"], "height=100 is not a multiple of 64"),
    ("width-negative", ["width=-64"], "width=-64 is not a multiple of 64"),
    ("n-frames-zero", ["n_frames=0"], "n_frames=0 must be >= 1"),
    ("stride-zero", ["frame_stride=0"], "frame_stride=0 must be >= 1"),
    ("steps-negative", ["n_steps=-3"], "n_steps=-3 must be >= 1"),
    ("chunk-zero", ["chunk_size=0"], "chunk_size=0 must be >= 1"),
    ("inverter-steps", ["inverter.n_steps=-1"], "inverter.n_steps=-1 must be >= 1"),
    ("misspelled-option", ["editor=pnpp"], "editor=pnpp is not an option of editor — use one of"),
    ("unknown-model", ["model=sd99"], "model=sd99 is not an option of model"),
    ("unknown-key", ["foo=1"], "foo=1: tokenflow has no setting 'foo'"),
    ("added-unknown-key", ["+foo=1"], "foo=1: tokenflow has no setting 'foo'"),
    ("unknown-nested-key", ["editor.nope=2"], "editor.nope=2: the editor has no setting 'nope'"),
    ("added-nested-key", ["+editor.nope=3"], "has no setting 'nope'"),
    ("wrong-type", ["height=abc"], "height=abc: Value 'abc'"),
    ("bad-syntax", ["prompt=a (red fox"], "cannot parse the override 'prompt=a (red fox'"),
    ("class-not-found", ["editor=nomodule_here.MyEditor"], "No module named 'nomodule_here'"),
    ("class-wrong-kind", ["editor=tokenflow.core.search.TorchNeighbourSearch"], "is not a KeyframeEditor"),
    ("class-unknown-setting", ["propagator=none", "+propagator.radius=1"], "NoPropagation() takes no arguments"),
    ("bad-device", ["device=tpu"], "device='tpu'"),
    ("bad-dtype", ["dtype=float8"], "dtype='float8' is unknown"),
    ("guidance-nan", ["editor.guidance_scale=nan"], "editor.guidance_scale=nan is not a finite number"),
    ("guidance-inf", ["editor.guidance_scale=inf"], "editor.guidance_scale=inf is not a finite number"),
    ("strength-minus-inf", ["editor=sdedit", "editor.strength=-inf"], "editor.strength=-inf is not a finite number"),
    ("steps-past-training", ["n_steps=1001"], "1001 DDIM steps on a model trained with 1000 timesteps"),
    ("inverter-steps-past-training", ["inverter.n_steps=5000"], "5000 DDIM steps on a model trained with 1000"),
    ("seed-2-63", ["seed=9223372036854775808"], "seed=9223372036854775808 is outside 0..2^63-1"),
    ("seed-2-64", ["seed=18446744073709551616"], "seed=18446744073709551616 is outside 0..2^63-1"),
    ("seed-negative", ["seed=-1"], "seed=-1 is outside 0..2^63-1"),
    ("run-dir-below-a-file", ["hydra.run.dir=FILE:image.png/run"], "image.png/run cannot be created or written"),
    ("cache-dir-is-a-file", ["cache_dir=FILE:image.png"], "a file stands where a folder is needed"),
]
SIZE_CASES = [  # need the (tiny) model's shapes: refused before any frame is decoded
    ("huge-size", ["height=16384", "width=16384"], "needs about"),
    ("thin-clip-default-size", ["video=FILE:thin.mp4"], "default sizing of a 32x2000 clip"),
    ("encoder-limit", ["video=FILE:big.mp4", "height=64", "width=16448"], "at most 16384 pixels a side"),
]


def _args(args: list[str], files: dict[str, Path]) -> list[str]:
    return [a.replace("FILE:", str(files[a.split("FILE:")[1].split("/")[0]].parent) + "/") if "FILE:" in a else a
            for a in args]


@pytest.mark.parametrize("args, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(args, message, files, tmp_path, cache_dir, capfd, monkeypatch):
    code, out, err = cli([*TINY, *_args(args, files)], tmp_path, cache_dir, capfd, monkeypatch)
    assert_one_line(code, err, message)
    assert not list(tmp_path.rglob("edited.mp4")) and not list(tmp_path.rglob("input.mp4"))
    for metrics in tmp_path.rglob("metrics.json"):  # a job that started records its failure
        record = json.loads(metrics.read_text())
        assert record["status"] == "failed" and message.split(" — ")[0] in record["error"]
        assert (metrics.parent / "config.yaml").is_file()


@pytest.mark.parametrize("args, message", [c[1:] for c in SIZE_CASES], ids=[c[0] for c in SIZE_CASES])
def test_impossible_sizes_are_refused_up_front(args, message, files, tmp_path, cache_dir, capfd, monkeypatch):
    base = [a for a in TINY if not a.startswith(("height", "width", "n_frames"))]
    start = time.perf_counter()
    code, out, err = cli([*base, *_args(args, files)], tmp_path, cache_dir, capfd, monkeypatch)
    line = assert_one_line(code, err, message)
    assert "the largest size that fits is height=" in line, line
    assert time.perf_counter() - start < 120  # no decoding at that size, no UNet (minutes before)
    assert "TokenFlow editing" not in out + err and not list(tmp_path.rglob("*.mp4"))


def test_largest_size_that_fits_is_exact():
    """The suggested size fits, the next larger one (same aspect) does not, and the refusal names both numbers."""
    from tokenflow.core.memory import ModelShape, RunShape, check_memory, estimate_peak, fits, largest_fitting_size
    from tokenflow.errors import ConfigError

    # Stable Diffusion 1.5/2.1's shapes (UNet and VAE block_out_channels, attention levels), float32
    levels = (0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0)  # attn1 of down, mid and up blocks (UNetLayout)
    m = ModelShape((320, 640, 1280, 1280), (True, True, True, False), 2, 4, 8, (128, 256, 512, 512), 4, 4,
                   self_attention_levels=levels)
    run = RunShape(24, 8192, 8192, 50, branches=3, keyframes=3, chunk_size=8)
    free = 8 << 30
    h, w = largest_fitting_size(m, run, free, None)
    assert h == w and fits(estimate_peak(m, run.resized(h, w)), free, None)
    assert not fits(estimate_peak(m, run.resized(h + 64, w + 64)), free, None)
    with pytest.raises(ConfigError, match=rf"needs about .* but 8.0 GiB is free — the largest size that fits is height={h} width={w}"):
        check_memory(m, run, free)


def test_default_sizing_that_distorts_the_aspect_ratio_is_reported(files, tmp_path, cache_dir, capfd, monkeypatch):
    # odd.mp4 is 64x96: height=64 gives width round64(96)=128, +33% wider; n_frames=5 then stops the run early
    code, out, err = cli([*TINY[:1], f"video={files['odd.mp4']}", "height=64", "n_frames=5"], tmp_path, cache_dir,
                         capfd, monkeypatch)
    assert code == 2 and "the aspect ratio changes by +33%" in out + err


# ---- disks -------------------------------------------------------------------------------------------
FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    from tokenflow.errors import VideoError
    from tokenflow.storage.mp4 import write_video
    frames = np.random.default_rng(0).integers(0, 255, (12, 128, 128, 3), dtype=np.uint8)  # ~50 kB a frame
    try:
        write_video(sys.argv[1], frames, 10.0)
    except VideoError as e:
        print("error:", e)
        sys.exit(3)
""")


def test_full_disk_publishes_no_video(tmp_path):
    """ffmpeg fails mid-stream (file size limit = a full disk): no edited.mp4, no temporary left, one clear error."""
    dest = tmp_path / "out" / "edited.mp4"
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(dest)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "could not write video" in result.stdout and "ffmpeg exited with status" in result.stdout
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_encoder_refusal_and_short_writes_publish_nothing(tmp_path, monkeypatch):
    """A size the encoder refuses, and an encoder that exits 0 but wrote fewer frames, publish no file."""
    import tokenflow.storage.mp4 as mp4
    from tokenflow.errors import VideoError

    frames = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(VideoError, match="at most 16384 pixels"):
        mp4.write_video(tmp_path / "wide.mp4", np.zeros((1, 64, 16448, 3), np.uint8), 10.0)
    real = mp4._encode_h264
    monkeypatch.setattr(mp4, "_encode_h264", lambda path, f, fps: real(path, f[:1], fps))  # stops after 1 frame
    with pytest.raises(VideoError, match="holds 1 frames of 64x64, not 2"):
        mp4.write_video(tmp_path / "short.mp4", frames, 10.0)
    assert not list(tmp_path.iterdir())


def test_unwritable_cache_warns_and_the_run_completes(files, tmp_path, cache_dir, capfd, monkeypatch):
    """cache_dir that cannot hold a folder (a file here; read-only or full alike): a warning, a finished run.

    The same run checks that a prompt past the text encoder's limit is reported (not cut silently).
    """
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    long_prompt = "prompt=" + " ".join(["a very detailed photo of a red fox"] * 12)
    (tmp_path / "run").mkdir()
    code, out, err = cli([*TINY, f"video={files['big.mp4']}", f"cache_dir={blocked}", f"model.cache_dir={cache_dir}",
                          long_prompt], tmp_path / "run", cache_dir, capfd, monkeypatch)
    assert code == 0, err[-3000:]
    assert "cannot be written" in out + err and "running without the cache" in out + err
    assert "longer than the text encoder" in out + err
    (edited,) = (tmp_path / "run").rglob("edited.mp4")
    assert json.loads((edited.parent / "metrics.json").read_text())["status"] == "ok"


def test_cache_write_failure_is_a_warning(tmp_path, monkeypatch, caplog):
    """A full (ENOSPC) or read-only (EROFS) cache folder: save warns, returns None, leaves no temporary."""
    import errno

    import torch

    import tokenflow.storage.cache as cache_module
    from tokenflow.models.trajectory import InversionResult

    result = InversionResult([981, 1], torch.zeros(2, 1, 4, 8, 8), torch.zeros(1, 4, 8, 8), "p", {"s": 1})
    cache = cache_module.InversionCache(tmp_path)
    for code in (errno.ENOSPC, errno.EROFS):
        def fail(tensors, path, metadata=None, code=code):
            Path(path).write_bytes(b"partial")
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(cache_module, "save_file", fail)
        assert cache.save("k" * 32, result) is None
        assert os.strerror(code) in caplog.text and "going on without caching" in caplog.text
        assert not list(tmp_path.iterdir())


def test_unwritable_run_folder_is_one_line(tmp_path, cache_dir, capfd, monkeypatch):
    (tmp_path / "outputs").write_text("a file where the outputs folder should be")
    code, out, err = cli(TINY, tmp_path, cache_dir, capfd, monkeypatch)
    assert code == 2 and len([l for l in err.splitlines() if l.strip()]) == 1 and "error: " in err, err[-2000:]
    assert "outputs" in err and "Traceback" not in err


# ---- stale temporaries ---------------------------------------------------------------------------------
def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    from tokenflow.atomic import host_name, remove_stale, temp_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f".x.safetensors.tmp-{host_name()}-{dead.pid}-0123456789ab"
    gone.write_bytes(b"half")
    mine = temp_path(tmp_path / "y.safetensors")  # this (running) process owns it
    mine.write_bytes(b"in progress")
    other_host = tmp_path / f".z.mp4.tmp-elsewhere-{dead.pid}-0123456789ab.mp4"
    other_host.write_bytes(b"?")
    staging_old, staging_new = tmp_path / ".tiny-old12345", tmp_path / ".tiny-new12345"
    for d in (staging_old, staging_new):
        d.mkdir()
        (d / "unet").mkdir()
        (d / "unet" / "config.json").write_text("{}")
    old = time.time() - 30 * 24 * 3600  # written before any running process started
    for p in [staging_old, *staging_old.rglob("*")]:
        os.utime(p, (old, old))
    unrelated = tmp_path / ".hidden-notes"
    unrelated.write_text("keep")
    removed = remove_stale(tmp_path)
    assert set(removed) == {gone, staging_old}
    assert mine.exists() and other_host.exists() and staging_new.exists() and unrelated.exists()


# ---- kills ---------------------------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    # tokenflow-edit that SIGKILLs itself at one point: argv[1] names it, the rest are the overrides
    import os, signal, sys
    point = sys.argv.pop(1)
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "cache-write":  # the inversion cache entry written but for its header (the trajectory streams in)
        import tokenflow.storage.cache as c
        c.EntryWriter.publish = lambda self, *a, **k: die()
    elif point == "video-encode":  # edited.mp4's encoder mid-stream (frames are streamed to it as decoded)
        import tokenflow.storage.mp4 as v
        real = v.VideoWriter.write
        def partial(self, frames):
            real(self, frames[:1])
            die()
        v.VideoWriter.write = partial
    elif point == "frames":  # frames/ half written
        import PIL.Image
        real_save = PIL.Image.Image.save
        count = []
        def save(self, fp, *a, **k):
            count.append(1)
            if len(count) == 2:
                die()
            return real_save(self, fp, *a, **k)
        PIL.Image.Image.save = save
    elif point == "metrics":  # every output written, metrics.json not yet
        import tokenflow.runs.report as r
        real_write = r.RunReport.write
        r.RunReport.write = lambda self, error=None: die()
    from tokenflow.cli.main import edit_main
    sys.argv[0] = "tokenflow-edit"
    edit_main()
""")


def _spawn(args: list[str], cwd: Path, cache: Path, point: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", KILLER, point, *args] if point else [str(BIN / "tokenflow-edit"), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """Wait for ``proc``; kill it (and fail) when it runs past ``timeout`` so no run outlives the test."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args[:3]}... ran past {timeout} s")


def _temporaries(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob(".*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_kill_and_rerun(files, tmp_path, cache_dir):
    """SIGKILL at four points, each followed by a run that must clean up and finish; killed runs publish nothing."""
    if not (BIN / "tokenflow-edit").exists():
        pytest.skip("tokenflow-edit is not installed (pip install -e .)")
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    for model in (cache_dir / "models").glob("tiny-*"):  # the built tiny model, shared read-only
        (cache / "models" / model.name).symlink_to(model)
    work = tmp_path / "work"
    work.mkdir()
    args = [*TINY, f"video={files['big.mp4']}", "prompt=a fox"]
    for point in ("cache-write", "video-encode", "frames", "metrics"):
        killed = _spawn(args, work, cache, point)
        _finish(killed)
        assert killed.returncode == -signal.SIGKILL, point
        assert _temporaries(cache, work), f"the kill at {point} left nothing to clean up: the test does not test"
        runs = sorted(work.glob("outputs/edit/*/*/config.yaml"))
        killed_run = runs[-1].parent
        assert not [p.name for p in killed_run.iterdir() if not p.name.startswith(".")
                    and p.name not in ("config.yaml", "manifest.json") and p.suffix != ".log"], point
        # (config.yaml and manifest.json record what was asked, written first); no output, no metrics.json
    rerun = _spawn(args, work, cache)
    out, err = _finish(rerun)
    assert rerun.returncode == 0, err[-3000:]
    assert not _temporaries(cache, work), _temporaries(cache, work)
    (last,) = [p for p in work.rglob("metrics.json")]
    record = json.loads(last.read_text())
    assert record["status"] == "ok" and record["metrics"]["inversion_cache_hit"] == 1.0  # the entry is whole
    from tokenflow.storage.video import read_video

    assert read_video(last.parent / "edited.mp4", height=64, width=64).n_frames == 2 and len(list((last.parent / "frames").iterdir())) == 2


# ---- concurrency ---------------------------------------------------------------------------------------
SAME_SECOND = textwrap.dedent("""
    # start tokenflow-edit at a given wall-clock time (argv[1]), so two processes begin in the same second
    import sys, time
    from tokenflow.cli.main import edit_main
    at = float(sys.argv.pop(1))
    time.sleep(max(0.0, at - time.time()))
    sys.argv[0] = "tokenflow-edit"
    edit_main()
""")


@pytest.mark.slow
def test_concurrent_runs_get_their_own_folders(files, tmp_path, cache_dir):
    """Two runs started in the same second in the same folder: two folders, each with its own prompt and video."""
    env = {**os.environ, "TOKENFLOW_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    at = float(int(time.time()) + 8) + 0.05  # imports done by then; both resolve ${now:...} within that second
    procs = []
    for prompt, clip in (("a fox", "big.mp4"), ("a cat", "ok.mp4")):
        cmd = [sys.executable, "-c", SAME_SECOND, str(at), *TINY, f"video={files[clip]}", f"prompt={prompt}"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [_finish(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    folders = sorted(p.parent for p in tmp_path.rglob("metrics.json"))
    assert len(folders) == 2 and folders[0].parent == folders[1].parent  # same second: <time> and <time>-1
    assert folders[1].name == folders[0].name + "-1"
    from tokenflow.storage.video import read_video

    seen = set()
    for folder in folders:
        record = json.loads((folder / "metrics.json").read_text())
        prompt = record["overrides"]["prompt"]
        clip = {"a fox": files["big.mp4"], "a cat": files["ok.mp4"]}[prompt]
        assert f"prompt: {prompt}" in (folder / "config.yaml").read_text() and record["info"]["video"] == str(clip)
        source = read_video(clip, n_frames=2, height=64, width=64).frames
        written = read_video(folder / "input.mp4", height=64, width=64).frames
        assert np.abs(written.astype(int) - source.astype(int)).mean() < 8  # this run's clip (H.264 round trip)
        assert len(list((folder / "frames").glob("*.png"))) == 2 and (folder / "edited.mp4").is_file()
        seen.add(prompt)
    assert seen == {"a fox", "a cat"}


def _rival_after_each_look(monkeypatch, base: Path) -> list[str]:
    """Make every look at a free candidate folder of ``base`` (Path.exists/is_dir, os.path.exists/isdir/lexists)
    be followed at once by another run's exclusive mkdir of it (the first such look only); → the rival's folders."""
    rival: list[str] = []

    def racing(look):
        def check(path, *args, **kwargs):
            found = look(path, *args, **kwargs)
            p = Path(path)
            if not found and not rival and p.parent == base.parent and p.name.startswith(base.name):
                os.mkdir(p)  # the other run's claim, between this look and whatever comes next
                rival.append(str(p))
            return found
        return check

    for owner, name in ((Path, "exists"), (Path, "is_dir"), (os.path, "exists"), (os.path, "isdir"),
                        (os.path, "lexists")):
        monkeypatch.setattr(owner, name, racing(getattr(owner, name)))
    return rival


def test_claimed_folders_are_exclusive(tmp_path, monkeypatch):
    from tokenflow.cli.rundir import claim_dir

    base = tmp_path / "outputs" / "12-00-00"
    claimed = [claim_dir(base) for _ in range(3)]
    assert claimed == [str(base), f"{base}-1", f"{base}-2"] and all(Path(c).is_dir() for c in claimed)
    # another run takes a folder just after this claim saw it free: only an exclusive mkdir notices, and the
    # claim takes the next name (a look followed by mkdir(exist_ok=True) would share the rival's folder)
    base = tmp_path / "outputs" / "12-00-01"
    rival = _rival_after_each_look(monkeypatch, base)
    raced = claim_dir(base)
    monkeypatch.undo()
    assert raced in (str(base), f"{base}-1") and Path(raced).is_dir()
    assert raced not in rival, f"{raced} is also the other run's folder"
