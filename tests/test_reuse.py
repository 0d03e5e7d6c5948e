"""Prompt sweeps reuse what does not depend on the prompt: the source branch's correspondences.

The first edit of a video records its nearest-neighbour fields; the next edits (other prompts, same
video, keyframe schedule and propagator) read them: the result is the same as searching again, and an
editor that needs no source branch of its own (SDEdit) runs without one.
"""
from __future__ import annotations

import pytest
import torch

from conftest import UNetCounter, translation_clip
from tokenflow import DDIMInverter, FixedKeyframes, TokenFlowPipeline, TokenFlowPropagator, invert_video
from tokenflow.core.search import TorchNeighbourSearch
from tokenflow.editors import PnPEditor, SDEditEditor

N, STEPS = 6, 3


@pytest.fixture(scope="module")
def inversion(tiny):
    video = translation_clip(n=N, size=64, shift=8)
    return invert_video(tiny, video, DDIMInverter(n_steps=STEPS, keep_steps=STEPS), "a texture", progress=False)[0]


class CountingSearch(TorchNeighbourSearch):
    """The default exact search (same name and exactness, so the same record key) that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def search(self, queries, keys):
        self.calls += 1
        return super().search(queries, keys)


def _edit(tiny, inversion, editor, prompt, cache_dir=None, keyframes=(1, 4), search=None):
    reuse = cache_dir is not None
    propagator = TokenFlowPropagator(search=search, reuse_correspondences=reuse,
                                     cache_dir=str(cache_dir) if reuse else None)
    pipe = TokenFlowPipeline(tiny, editor, propagator, FixedKeyframes(list(keyframes)), n_steps=STEPS, chunk_size=2)
    fields = []
    with UNetCounter(tiny.unet) as counter:
        result = pipe.edit(inversion, prompt, "ugly", progress=False,
                           on_match=lambda layer, frames, k, index, sim: fields.append((layer, frames.tolist(), k, index)))
    return result, counter.samples, fields


def test_sdedit_sweep_reads_the_fields_and_drops_the_source_branch(tiny, inversion, tmp_path):
    first, first_evals, first_fields = _edit(tiny, inversion, SDEditEditor(strength=1.0), "a red texture", tmp_path)
    second, second_evals, second_fields = _edit(tiny, inversion, SDEditEditor(strength=1.0), "a blue texture", tmp_path)
    fresh, fresh_evals, fresh_fields = _edit(tiny, inversion, SDEditEditor(strength=1.0), "a blue texture")
    assert first_evals == fresh_evals == STEPS * 3 * N  # source + uncond + cond for every frame
    assert second_evals == STEPS * 2 * N                 # the recorded fields need no source branch
    # the read fields are exactly the fields a new search finds
    assert len(second_fields) == len(fresh_fields) > 0
    for (l1, f1, k1, i1), (l2, f2, k2, i2) in zip(second_fields, fresh_fields):
        assert (l1, f1, k1) == (l2, f2, k2) and torch.equal(i1, i2)
    # the same edit up to the UNet's batch size (2 branches instead of 3 in one call)
    assert torch.allclose(second.latents, fresh.latents, atol=1e-4), float((second.latents - fresh.latents).abs().max())
    assert not torch.allclose(first.latents, second.latents, atol=1e-2)  # and it is the new prompt's edit


def test_pnp_sweep_reads_the_fields_and_gives_the_same_edit(tiny, inversion, tmp_path):
    first_search, second_search, fresh_search = CountingSearch(), CountingSearch(), CountingSearch()
    _edit(tiny, inversion, PnPEditor(), "a red texture", tmp_path, search=first_search)
    second, second_evals, _ = _edit(tiny, inversion, PnPEditor(), "a blue texture", tmp_path, search=second_search)
    fresh, fresh_evals, _ = _edit(tiny, inversion, PnPEditor(), "a blue texture", search=fresh_search)
    assert second_evals == fresh_evals == STEPS * 3 * N  # PnP injects from the source branch: it stays
    # the recording edit and a fresh edit search; the replaying edit reads the fields and never searches
    assert first_search.calls == fresh_search.calls > 0
    assert second_search.calls == 0
    assert torch.equal(second.latents, fresh.latents)


def test_records_are_keyed_and_only_complete_ones_are_read(tiny, inversion, tmp_path):
    _edit(tiny, inversion, SDEditEditor(strength=1.0), "a red texture", tmp_path)
    records = list((tmp_path / "correspondences").iterdir())
    assert len(records) == 1 and (records[0] / "complete.json").is_file()
    assert len(list(records[0].glob("t*.safetensors"))) == STEPS and not list(records[0].glob(".*"))
    # another keyframe schedule is another record
    _, evals, _ = _edit(tiny, inversion, SDEditEditor(strength=1.0), "a red texture", tmp_path, keyframes=(0, 3))
    assert evals == STEPS * 3 * N and len(list((tmp_path / "correspondences").iterdir())) == 2
    # a record cut short (a killed run: no complete.json) is recorded again, not read
    (records[0] / "complete.json").unlink()
    _, evals, _ = _edit(tiny, inversion, SDEditEditor(strength=1.0), "a blue texture", tmp_path)
    assert evals == STEPS * 3 * N and (records[0] / "complete.json").is_file()
    _, evals, _ = _edit(tiny, inversion, SDEditEditor(strength=1.0), "a green texture", tmp_path)
    assert evals == STEPS * 2 * N
