"""One video across two processes (gloo on CPU): the edit is identical to a single process's, bit for bit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

N_FRAMES, STEPS = 10, 3


def _edit(cache_dir: str, context: str, variant: str = "sd21-base"):
    """The same edit in any process: tiny model, a synthetic clip, PnP (SD 3.5: KV injection) + TokenFlow, stride 2
    keyframes."""
    from conftest import translation_clip
    from tokenflow import DDIMInverter, RandomKeyframes, TokenFlowPipeline, TokenFlowPropagator, invert_video, load_model
    from tokenflow.core.attention import KeyframeAttention
    from tokenflow.editors import KVInjectionEditor, PnPEditor

    torch.set_num_threads(1)  # the same kernels in every process
    model = load_model("tiny", device="cpu", dtype="float32", cache_dir=cache_dir, tiny_variant=variant)
    mmdit = model.family == "mmdit"
    if mmdit:
        model.max_sequence_length = 16
    video = translation_clip(n=N_FRAMES, size=64, shift=16 if mmdit else 8)
    inversion, _ = invert_video(model, video, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a texture", progress=False)
    attention = KeyframeAttention(context, anchors=2, segment=2)
    pipe = TokenFlowPipeline(model, KVInjectionEditor() if mmdit else PnPEditor(), TokenFlowPropagator(), RandomKeyframes(2, seed=3), n_steps=STEPS,
                             chunk_size=2, attention=attention)
    result = pipe.edit(inversion, "a red texture", "ugly", progress=False)
    return result.latents, result.unet_evaluations


def _worker(rank: int, world: int, rendezvous: str, cache_dir: str, context: str, out: str, variant: str) -> None:
    """A fresh process (world 1: the single-process reference; else one rank of a gloo group)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        latents, evaluations = _edit(cache_dir, context, variant)
        torch.save({"latents": latents, "evaluations": evaluations}, f"{out}.{world}.{rank}")
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.parametrize("variant, context", [("sd21-base", "all"), ("sd21-base", "anchors"), ("sd35-medium", "all")],
                         ids=["all", "anchors", "sd35"])
def test_two_processes_give_the_single_process_edit(tmp_path, cache_dir, variant, context):
    from tokenflow.models import load_model

    load_model("tiny", device="cpu", dtype="float32", cache_dir=str(cache_dir), tiny_variant=variant)  # built once,
    # before the workers
    out = str(tmp_path / "result")
    for world in (1, 2):  # the reference in a fresh process too: thread pools and kernel caches start alike
        mp.start_processes(_worker, args=(world, str(tmp_path / f"rendezvous{world}"), str(cache_dir), context, out, variant),
                           nprocs=world, join=True, start_method="spawn")
    single = torch.load(f"{out}.1.0")
    results = [torch.load(f"{out}.2.{rank}") for rank in range(2)]
    for result in results:
        assert torch.equal(result["latents"], single["latents"]), float((result["latents"] - single["latents"]).abs().max())
    # each rank computes the keyframe/anchor pass and its own share of the rest: together more than one process,
    # each less than one process alone
    shares = [r["evaluations"] for r in results]
    assert all(share < single["evaluations"] for share in shares) and sum(shares) >= single["evaluations"]
