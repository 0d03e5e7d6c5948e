"""The reference experiments change exactly the keys documented in docs/reference.md, nothing else."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import tokenflow.cli.config  # noqa: F401  registers the run schema
from conftest import needs_data
from tokenflow import FixedKeyframes, TokenFlowPipeline, invert_video
from tokenflow.instantiation import build

DOC = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


SECTIONS = {"reference_pnp": "## Every difference between `reference` and the defaults",
            "reference_sdedit": "## Every difference between `reference` and the defaults",
            "reference_adaflow": "## Every difference between `reference_adaflow` and the defaults"}
EXPERIMENTS = [("reference_pnp", "pnp"), ("reference_sdedit", "sdedit"), ("reference_adaflow", "pnp")]


def documented_keys(experiment: str = "reference_pnp") -> set[str]:
    """The keys of the experiment's table in docs/reference.md (its section, up to the next heading)."""
    table = re.split(r"^#{1,2} ", DOC.read_text().split(SECTIONS[experiment], 1)[1], maxsplit=1, flags=re.M)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))


def leaves(cfg) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node
    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def compose_edit(*overrides: str):
    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        return compose(config_name="edit", overrides=["video=x.mp4", *overrides])


@pytest.mark.parametrize("experiment, editor", EXPERIMENTS)
def test_reference_changes_only_documented_keys(experiment, editor):
    default = leaves(compose_edit(f"editor={editor}"))
    reference = leaves(compose_edit(f"experiment={experiment}"))
    changed = {k for k in default.keys() | reference.keys() if default.get(k) != reference.get(k)}
    changed -= {"experiment"}
    assert changed, "the reference experiment changes nothing"
    documented = documented_keys(experiment)  # a documented group (`keyframes`) covers every key under it
    undocumented = {k for k in changed if k not in documented and not any(k.startswith(f"{d}.") for d in documented)}
    assert not undocumented, f"undocumented differences: {sorted(undocumented)}"


@pytest.mark.parametrize("experiments", [["reference_pnp", "reference_sdedit"], ["reference_adaflow"]])
def test_every_documented_key_is_used_by_a_reference_experiment(experiments):
    used = set()
    for experiment, editor in [e for e in EXPERIMENTS if e[0] in experiments]:
        default, reference = leaves(compose_edit(f"editor={editor}")), leaves(compose_edit(f"experiment={experiment}"))
        used |= {k for k in default.keys() | reference.keys() if default.get(k) != reference.get(k)}
    documented = documented_keys(experiments[0])
    unused = {d for d in documented if d not in used and not any(k.startswith(f"{d}.") for k in used)}
    assert not unused, sorted(unused)


@needs_data
def test_with_fixed_keyframes_reference_differs_only_by_the_table(tiny, wolf8):
    """Reference with every table key reset to its default produces bit-identical frames to the default."""
    common = ["model=tiny", "n_steps=4", "n_frames=8"]
    default = compose_edit(*common)
    reset = [f"{k}={v}" for k, v in leaves(default).items() if k in documented_keys() and v is not None]
    as_default = compose_edit("experiment=reference_pnp", *common, *reset)
    reference = compose_edit("experiment=reference_pnp", *common, "inverter.n_steps=8")  # 500 steps: too slow here

    def run(cfg):
        pipe = TokenFlowPipeline(tiny, build(cfg.editor), build(cfg.propagator), FixedKeyframes([1, 6]),
                                 build(cfg.inverter), n_steps=cfg.n_steps, chunk_size=cfg.chunk_size)
        inversion, _ = invert_video(tiny, wolf8, pipe.inverter, "a wolf", progress=False)
        return pipe.edit(inversion, "a robotic wolf", "ugly", progress=False).latents

    base = run(default)
    assert torch.equal(run(as_default), base)
    assert not torch.allclose(run(reference), base, atol=1e-4)
