"""One command for the first GPU: every CUDA path of the library, one Markdown table (issue 23).

    python experiments/gpu_check.py --json gpu_check.json     # on one GPU, about 8 minutes
    python experiments/gpu_check.py --smoke --json smoke.json # the same code paths on CPU, tiny sizes

Each section is guarded: a failure is a row ``failed: <one line>`` and the other sections still run.
Rows: section | setting | figures | status (ok / skipped: reason / failed: one line). Figures:

1. ``pytest``: counts of ``pytest -m gpu`` (the CUDA-marked tests), run as a subprocess.
2. ``edit``: PnP + TokenFlow through ``TokenFlowPipeline`` with a random-weight model built from the
   published config of SD 2.1-base (512²) and SDXL (1024²) at full width (``--smoke``: width / 8, 64²,
   float32), per dtype. ``inv_s_per_frame`` / ``edit_s_per_frame`` / ``decode_s_per_frame``: seconds per
   frame of each stage (``EditResult.timings``: inversion, editing, decoding); ``peak_mb``:
   ``torch.cuda.max_memory_allocated`` during the edit (MiB; CPU: process peak RSS).
3. ``search``: nearest-neighbour search at SD's token shapes (2 keyframes, 8 frames' queries);
   ``exact``: fraction of argmax indices equal to a float32 dense argmax; ``ms``: time per search.
4. ``sdpa``: each backend on the extended keyframe attention shape (queries and keys: K keyframes x S
   tokens); ``ms`` per call and ``max_abs_diff`` against the math backend.
5. ``compile``: ``torch.compile`` of the UNet off / on: ``ms_per_call`` (after warm-up), ``compile_s``.
6. ``nccl``: all-reduce across 2 processes (2 GPUs): ``ms`` and ``gb_s`` (algorithm bandwidth).
7. ``memory``: peak memory of an edit at N frames (default and ``attention=anchors``) against the
   library's estimate (``estimate_peak`` of the run's ``RunShape``, as the preflight adds it to what is
   held): ``measured_mb`` (CUDA: ``max_memory_allocated``; CPU: process peak RSS, a lifetime maximum, so
   an earlier section's peak can dominate it), ``estimate_mb`` (allocated / RSS before the edit + the
   estimate's device / host bytes) and ``ratio`` = measured / estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 2**20


@dataclass
class Row:
    section: str
    setting: str
    figures: dict[str, float] = field(default_factory=dict)
    status: str = "ok"


def skipped(section: str, setting: str, reason: str) -> Row:
    return Row(section, setting, status=f"skipped: {reason}")


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


@dataclass(frozen=True)
class Sizes:
    """What each section runs at: the GPU sizes, or ``--smoke``'s tiny CPU ones."""

    smoke: bool
    device: str
    edits: tuple[tuple[str, int, str], ...]  # (variant, size, dtype)
    divisor: int          # width divisor of the random-weight models (1: published widths)
    frames: int           # frames per edit
    steps: int            # inversion and edit steps
    search_shapes: tuple[tuple[int, int], ...]
    sdpa: tuple[int, int, int, int]  # keyframes K, tokens S, heads, head width
    memory_frames: tuple[int, ...]
    memory_size: int

    @classmethod
    def make(cls, smoke: bool) -> "Sizes":
        if smoke:
            return cls(True, "cpu", (("sd21-base", 64, "float32"), ("sdxl", 64, "float32")), 8, 2, 2,
                       ((64, 32), (16, 64)), (2, 64, 2, 8), (2, 3, 4), 64)
        edits = tuple((v, s, d) for v, s in (("sd21-base", 512), ("sdxl", 1024)) for d in ("float16", "bfloat16"))
        return cls(False, "cuda", edits, 1, 8, 5, ((4096, 320), (1024, 640), (256, 1280)), (4, 4096, 5, 64),
                   (24, 120, 480), 256)


# ---- shared helpers ----------------------------------------------------------------------------------

def random_model(variant: str, divisor: int, device: str, dtype: str):
    """A DiffusionModel of ``variant``'s published config (widths / ``divisor``), random weights, built on
    ``device`` (the tiny model's output damping, so inversion stays finite; the real CLIP tokenizers)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from tokenflow.models.loading import _assemble, resolve_dtype
    from tokenflow.models.tiny import _numbered, _save_tokenizer, _text_encoders
    from tokenflow.models.variants import checkpoint, tiny

    ckpt = tiny(checkpoint(variant), divisor)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**ckpt.unet)
        vae = AutoencoderKL(**ckpt.vae)
        encoders = _text_encoders(ckpt)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = []
        for i, options in enumerate(ckpt.tokenizers):
            _save_tokenizer(Path(tmp) / _numbered("tokenizer", i), **options)
            tokenizers.append(CLIPTokenizer.from_pretrained(Path(tmp) / _numbered("tokenizer", i)))
    scheduler = DDIMScheduler.from_config({k: v for k, v in ckpt.scheduler.items() if k != "_class_name"})
    dev = torch.device(device)
    return _assemble(vae, encoders["text_encoder"], tokenizers[0], unet, scheduler, dev, resolve_dtype(dtype, dev),
                     f"random:{variant}/{divisor}", encoders.get("text_encoder_2"),
                     tokenizers[1] if len(tokenizers) > 1 else None)


def clip(n: int, size: int):
    """The embedded sample clip at size x size, looped to ``n`` frames."""
    import numpy as np

    from tokenflow.samples import sample_video_path
    from tokenflow.storage.video import Video, read_video

    video = read_video(sample_video_path(), height=size, width=size)
    frames = np.concatenate([video.frames] * (-(-n // video.n_frames)))[:n]
    return Video(frames, video.fps, video.source)


def pipeline(model, steps: int, anchors: bool = False):
    from tokenflow import DDIMInverter, KeyframeAttention, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator
    from tokenflow.editors import PnPEditor

    attention = KeyframeAttention(context="anchors") if anchors else KeyframeAttention()
    return TokenFlowPipeline(model, PnPEditor(), TokenFlowPropagator(), RandomKeyframes(stride=8, seed=0),
                             DDIMInverter(n_steps=steps, keep_steps=steps), n_steps=steps, attention=attention)


def edit(pipe, video):
    return pipe(video, "a robotic wolf", "ugly", "a wolf", progress=False)


def cuda_peak_reset() -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def timed(fn: Callable[[], object], repeats: int = 3, cuda: bool = False) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def free(*_: object) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the sections -----------------------------------------------------------------------------------

def check_pytest(s: Sizes) -> list[Row]:
    if s.smoke:
        return [skipped("pytest", "-m gpu", "--smoke (the CUDA tests skip without a GPU)")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    tail = (proc.stdout.strip().splitlines() or ["?"])[-1]
    counts = {k: float(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    status = "ok" if proc.returncode in (0, 5) and not counts.get("failed") else f"failed: {tail}"
    return [Row("pytest", "-m gpu", counts, status)]


def check_edit(s: Sizes) -> list[Row]:
    rows = []
    for variant, size, dtype in s.edits:
        setting = f"{variant} {size}² {dtype}, {s.frames} frames, {s.steps} steps"
        try:
            model = random_model(variant, s.divisor, s.device, dtype)
            video = clip(s.frames, size)
            if s.device == "cuda":
                cuda_peak_reset()
            result = edit(pipeline(model, s.steps), video)
            t = result.timings
            figures = {"inv_s_per_frame": t["inversion_s"] / s.frames, "edit_s_per_frame": t["editing_s"] / s.frames,
                       "decode_s_per_frame": t["decoding_s"] / s.frames, "peak_mb": peak_mb(s)}
            rows.append(Row("edit", setting, figures))
        except Exception as e:  # noqa: BLE001 -- one row per failure
            rows.append(Row("edit", setting, status=f"failed: {one_line(e)}"))
        finally:
            model = None
            free()
    return rows


def peak_mb(s: Sizes) -> float:
    if s.device == "cuda":
        return torch.cuda.max_memory_allocated() / MB
    from tokenflow.core.memory import peak_rss

    return peak_rss() / MB


def check_search(s: Sizes) -> list[Row]:
    from tokenflow.core.search import FaissNeighbourSearch, TorchNeighbourSearch, faiss_available

    dtype = torch.float32 if s.smoke else torch.float16
    gen = torch.Generator().manual_seed(0)
    faiss = FaissNeighbourSearch("flat") if faiss_available() else None
    rows = []
    for tokens, width in s.search_shapes:
        queries = torch.randn(2, 8 * tokens, width, generator=gen).to(s.device, dtype)
        keys = torch.randn(2, tokens, width, generator=gen).to(s.device, dtype)
        q, k = torch.nn.functional.normalize(queries.float(), dim=-1), torch.nn.functional.normalize(keys.float(), dim=-1)
        reference = (q @ k.transpose(1, 2)).argmax(-1)
        setting = f"{tokens}x{width} {str(dtype).replace('torch.', '')} on {s.device}"
        backends = {"torch": TorchNeighbourSearch()}
        if faiss is not None and faiss.gpu_supported() and s.device == "cuda":
            backends["faiss-gpu flat"] = faiss
        else:
            rows.append(skipped("search", f"faiss-gpu flat {setting}",
                                "needs CUDA" if s.device != "cuda" else
                                "faiss not installed" if faiss is None else "faiss build sees no GPU"))
        for name, backend in backends.items():
            try:
                index, _ = backend(queries, keys)
                exact = (index == reference).float().mean().item()
                ms = 1000 * timed(lambda: backend(queries, keys), cuda=s.device == "cuda")
                rows.append(Row("search", f"{name} {setting}", {"exact": exact, "ms": ms}))
            except Exception as e:  # noqa: BLE001
                rows.append(Row("search", f"{name} {setting}", status=f"failed: {one_line(e)}"))
    return rows


def check_sdpa(s: Sizes) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    k, tokens, heads, width = s.sdpa
    dtype = torch.float32 if s.smoke else torch.float16
    gen = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(1, heads, k * tokens, width, generator=gen).to(s.device, dtype) for _ in range(3))
    setting = f"{k} keyframes x {tokens} tokens, {heads} heads x {width}, {str(dtype).replace('torch.', '')}"
    rows, reference = [], None
    for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        if name != "math" and s.device != "cuda":
            rows.append(skipped("sdpa", f"{name} {setting}", "needs CUDA"))
            continue
        try:
            with sdpa_kernel(backend):
                out = sdpa(q, key, v)
                ms = 1000 * timed(lambda: sdpa(q, key, v), cuda=s.device == "cuda")
            reference = out.float() if reference is None else reference
            rows.append(Row("sdpa", f"{name} {setting}",
                            {"ms": ms, "max_abs_diff": (out.float() - reference).abs().max().item()}))
        except Exception as e:  # noqa: BLE001
            rows.append(Row("sdpa", f"{name} {setting}", status=f"failed: {one_line(e)}"))
    return rows


def check_compile(s: Sizes) -> list[Row]:
    dtype = "float32" if s.smoke else "float16"
    model = random_model("sd21-base", s.divisor, s.device, dtype)
    size = 64 if s.smoke else 512
    latents = torch.randn(2, 4, size // 8, size // 8, device=s.device, dtype=model.dtype)
    hidden = model.encode_text(["a wolf", ""]).hidden.to(s.device, model.dtype)
    setting = f"sd21-base UNet {size}² {dtype}, batch 2"
    call = lambda unet: unet(latents, 500, encoder_hidden_states=hidden).sample  # noqa: E731
    rows = []
    with torch.no_grad():
        rows.append(Row("compile", f"off: {setting}", {"ms_per_call": 1000 * timed(lambda: call(model.unet),
                                                                                   cuda=s.device == "cuda")}))
        if s.smoke:
            rows.append(skipped("compile", f"on: {setting}", "--smoke (compiling takes minutes on CPU)"))
        else:
            try:
                compiled = torch.compile(model.unet)
                start = time.perf_counter()
                call(compiled)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - start
                rows.append(Row("compile", f"on: {setting}", {"ms_per_call": 1000 * timed(lambda: call(compiled),
                                                                                          cuda=True),
                                                             "compile_s": compile_s}))
            except Exception as e:  # noqa: BLE001
                rows.append(Row("compile", f"on: {setting}", status=f"failed: {one_line(e)}"))
    return rows


def _nccl_worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    x = torch.ones(64 * MB, device="cuda", dtype=torch.float32)  # 256 MiB
    seconds = timed(lambda: dist.all_reduce(x), repeats=5, cuda=True)
    ok = x[0].item() == 2.0 ** 7  # one warm-up + 5 timed all-reduces of ones over 2 ranks
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps({"ms": 1000 * seconds, "gb_s": x.numel() * 4 / seconds / 1e9,
                                                           "sum_correct": float(ok)}))
    dist.destroy_process_group()


def check_nccl(s: Sizes) -> list[Row]:
    setting = "all_reduce 256 MiB float32, 2 processes"
    if s.smoke or not torch.cuda.is_available():
        return [skipped("nccl", setting, "needs 2 GPUs (--smoke: CPU)")]
    if torch.cuda.device_count() < 2:
        return [skipped("nccl", setting, f"needs 2 GPUs, {torch.cuda.device_count()} present")]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_nccl_worker, args=(folder,), nprocs=2, join=True)
        figures = json.loads(Path(folder, "result.json").read_text())
    return [Row("nccl", setting, figures, "ok" if figures["sum_correct"] else "failed: wrong all-reduce sum")]


def check_memory(s: Sizes) -> list[Row]:
    from omegaconf import OmegaConf

    from tokenflow.cli.preflight import run_shape
    from tokenflow.core.memory import ModelShape, current_rss, estimate_peak, peak_rss

    dtype = "float32" if s.smoke else "float16"
    model = random_model("sd21-base", s.divisor, s.device, dtype) if not s.smoke else None
    if s.smoke:
        from tokenflow.models.loading import load_model

        model = load_model("tiny", device="cpu", dtype="float32", cache_dir=os.environ.get("TOKENFLOW_CACHE"))
    rows = []
    for n in s.memory_frames:
        for anchors in (False, True):
            setting = f"{n} frames {s.memory_size}² {dtype}, attention={'anchors' if anchors else 'all'}"
            try:
                pipe = pipeline(model, s.steps, anchors)
                cfg = OmegaConf.create({"chunk_size": 8, "n_steps": s.steps, "metrics": None})
                plan = argparse.Namespace(height=s.memory_size, width=s.memory_size)
                shape = run_shape(cfg, model, plan, n, pipe.inverter, pipe.editor, pipe.propagator, pipe.keyframes,
                                  pipe.attention)
                estimate = estimate_peak(ModelShape.from_model(model), shape)
                video = clip(n, s.memory_size)
                if s.device == "cuda":
                    est = cuda_peak_reset() + estimate.device_bytes
                    edit(pipe, video)
                    measured = torch.cuda.max_memory_allocated()
                else:
                    est = current_rss() + estimate.host_bytes
                    edit(pipe, video)
                    measured = peak_rss()
                rows.append(Row("memory", setting, {"measured_mb": measured / MB, "estimate_mb": est / MB,
                                                    "ratio": measured / est if est else float("nan")}))
            except Exception as e:  # noqa: BLE001
                rows.append(Row("memory", setting, status=f"failed: {one_line(e)}"))
            finally:
                free()
    return rows


SECTIONS: dict[str, Callable[[Sizes], list[Row]]] = {
    "pytest": check_pytest, "edit": check_edit, "search": check_search, "sdpa": check_sdpa,
    "compile": check_compile, "nccl": check_nccl, "memory": check_memory,
}


# ---- output -----------------------------------------------------------------------------------------

def fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) and not value.is_integer() else f"{value:g}"


def table(rows: list[Row]) -> str:
    lines = ["| section | setting | figures | status |", "|---|---|---|---|"]
    for r in rows:
        figures = ", ".join(f"{k}={fmt(v)}" for k, v in r.figures.items()) or "-"
        lines.append(f"| {r.section} | {r.setting} | {figures} | {r.status.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same code paths on CPU at tiny sizes")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the sections")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device here — run with --smoke for the CPU check of the same code paths", file=sys.stderr)
        return 2
    sizes = Sizes.make(args.smoke)
    rows: list[Row] = []
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            rows += SECTIONS[name](sizes)
        except Exception as e:  # noqa: BLE001 -- the section's one-line failure; the rest still run
            rows.append(Row(name, "-", status=f"failed: {one_line(e)}"))
        free()
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
