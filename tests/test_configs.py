"""Every config composes and instantiates: a broken YAML fails here, not in a sweep."""
from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_object
from omegaconf import OmegaConf

import tokenflow.cli.config  # noqa: F401  registers the run schema
from tokenflow.editors import PnPEditor
from tokenflow.instantiation import build
from tokenflow.errors import ConfigError
from tokenflow.core.editor import KeyframeEditor
from tokenflow.core.inversion import Inverter
from tokenflow.core.keyframes import KeyframeSchedule
from tokenflow.core.propagation import Propagator
from tokenflow.core.search import NeighbourSearch

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir() and not g.name.startswith("_")}
BASES = {"inverter": Inverter, "propagator": Propagator, "search": NeighbourSearch, "keyframes": KeyframeSchedule,
         "editor": KeyframeEditor}


def _check_settings(target, settings: dict, where: str) -> None:
    """Every key of ``settings`` is a setting ``target`` takes: bound to its signature (all its required parameters
    given too); where it takes ``**kwargs``, a field of its documented ``Config`` dataclass, and the entries of a
    ``dict[str, SomeDataclass]`` field fields of that dataclass."""
    parameters = inspect.signature(target).parameters
    schema = getattr(target, "Config", None)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        try:
            inspect.signature(target).bind(**settings)
        except TypeError as e:
            pytest.fail(f"{where}: {sorted(settings)} do not fit {target.__qualname__}{inspect.signature(target)}: {e}")
        if not dataclasses.is_dataclass(schema):
            return
    schema = getattr(target, "Config", None)
    assert dataclasses.is_dataclass(schema), f"{where}: {target.__qualname__} takes **kwargs but documents no Config"
    known = {f.name for f in dataclasses.fields(schema)}
    assert set(settings) <= known, f"{where}: {sorted(set(settings) - known)} are not settings of {schema.__qualname__}"
    hints = typing.get_type_hints(schema)
    for key, value in settings.items():
        args = typing.get_args(hints[key])
        if typing.get_origin(hints[key]) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
            entry = {f.name for f in dataclasses.fields(args[1])}
            for name, spec in (value or {}).items():
                assert set(spec) <= entry, f"{where}.{key}.{name}: {sorted(set(spec) - entry)} are not settings of " \
                                           f"{args[1].__qualname__}"


def _compose(name="edit", overrides=()):
    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        return compose(config_name=name, overrides=["video=x.mp4", *overrides])


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts
                                           if g not in ("experiment", "dataset", "hydra")])
def test_every_group_option_instantiates(group, option):
    if group == "search" and option == "faiss":
        pytest.importorskip("faiss")
    cfg = _compose(overrides=[f"{group}={option}"])
    if group in ("model", "editor"):  # the YAML's keys, and what the composition passes, are the target's settings
        for where, node in ((f"conf/{group}/{option}.yaml", OmegaConf.load(CONF / group / f"{option}.yaml")),
                            (f"{group}={option}", cfg[group])):
            settings = OmegaConf.to_container(node, resolve=False)
            settings.pop("defaults", None)  # a file's defaults list (editor=controlnet's base editor) is Hydra's
            _check_settings(get_object(settings.pop("_target_")), settings, where)
            for key, value in settings.items():  # a nested editor (ControlNet's base) is bound to its own target
                if isinstance(value, dict) and "_target_" in value:
                    nested = dict(value)
                    _check_settings(get_object(nested.pop("_target_")), nested, f"{where}.{key}")
    if group == "model":
        assert cfg.model.source and cfg.model._target_ == "tokenflow.models.load_model"
        return  # real checkpoints are not downloaded here; tests/test_models.py loads tiny
    obj = build(cfg[group])
    if group in BASES:
        assert isinstance(obj, BASES[group])


def _settings_classes() -> list[type]:
    import tokenflow
    import tokenflow.editors

    found = {getattr(m, n) for m in (tokenflow, tokenflow.editors) for n in m.__all__}
    return sorted((c for c in found if isinstance(c, type) and dataclasses.is_dataclass(getattr(c, "Config", None))),
                  key=lambda c: c.__qualname__)


@pytest.mark.parametrize("cls", _settings_classes(), ids=lambda c: c.__qualname__)
def test_constructors_show_their_settings(cls):
    """help(), inspect.signature and notebook completion list a class's settings (its Config fields, with their
    defaults), not an opaque ``**config``."""
    parameters = inspect.signature(cls).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), \
        f"{cls.__qualname__}{inspect.signature(cls)} hides its settings behind **kwargs — decorate it with @configured"
    config = cls.Config()
    for f in dataclasses.fields(cls.Config):
        assert f.name in parameters, f"{cls.__qualname__}: setting {f.name!r} missing from the signature"
        assert parameters[f.name].default == getattr(config, f.name), f"{cls.__qualname__}.{f.name}: default differs"


@pytest.mark.parametrize("name", ["edit", "invert"])
def test_both_scripts_take_hydra_settings_from_one_file(name):
    """conf/hydra/tokenflow.yaml is the one home of the Hydra block (run folder claim, run log handler, sweep
    failure report), and both console scripts compose it: no `hydra:` key left in the primary configs."""
    assert "hydra" not in OmegaConf.load(CONF / f"{name}.yaml")
    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        cfg = compose(config_name=name, overrides=["video=x.mp4"], return_hydra_config=True)
    own = OmegaConf.load(CONF / "hydra" / "tokenflow.yaml")
    assert OmegaConf.to_container(cfg.hydra.run, resolve=False) == OmegaConf.to_container(own.run)
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep == OmegaConf.to_container(own.sweep) and sweep["dir"].startswith("${tokenflow.claim:")
    assert cfg.hydra.job_logging.handlers.file["class"] == "tokenflow.cli.logs.RunLogHandler"
    assert cfg.hydra.callbacks.failed_jobs._target_ == "tokenflow.cli.report.FailedJobs"


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
@pytest.mark.parametrize("name", ["edit", "invert"])
def test_every_experiment_composes(name, experiment):
    cfg = _compose(name, [f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)
    for group in ("inverter", "editor", "propagator", "keyframes"):
        build(cfg[group])


def test_interpolations_follow_top_level_keys():
    cfg = _compose(overrides=["n_steps=20", "keyframe_stride=4", "seed=7", "chunk_size=2"])
    assert cfg.inverter.n_steps == 20 and cfg.inverter.keep_steps == 20 and cfg.inverter.batch_size == 2
    assert cfg.keyframes.stride == 4 and cfg.keyframes.seed == 7 and cfg.propagator.stride == 4


def test_wrong_keys_and_types_fail_with_the_key_name():
    cfg = _compose(overrides=["+editor.guidance=3"])
    with pytest.raises(ConfigError, match="no setting 'guidance'"):
        build(cfg.editor)
    cfg = _compose(overrides=["editor.guidance_scale=abc"])
    with pytest.raises(ConfigError, match="guidance_scale"):
        build(cfg.editor)
    cfg = _compose(overrides=["editor.pnp_attn_t=1.5"])
    with pytest.raises(ConfigError, match=r"pnp_attn_t=1.5 must be in \[0, 1\]"):
        build(cfg.editor)


def test_editor_is_importable_without_hydra():
    editor = PnPEditor(guidance_scale=5.0, pnp_attn_t=0.3)
    assert editor.config.guidance_scale == 5.0 and editor.config.attn_layers is None  # derived from the UNet at install


def test_seeds_and_guidance_follow_the_run():
    """The SDEdit noise seed moves with the run seed; null-text inversion optimises for the editor's guidance."""
    cfg = _compose(overrides=["editor=sdedit", "editor.noise=random", "seed=5"])
    assert cfg.editor.seed == 5 and cfg.keyframes.seed == 5
    assert build(cfg.editor).config.seed == 5
    cfg = _compose(overrides=["inverter=nulltext", "editor.guidance_scale=4.5"])
    assert cfg.inverter.guidance_scale == 4.5 and build(cfg.inverter).config.guidance_scale == 4.5


def test_negative_prompt_defaults_to_empty_for_null_text():
    from tokenflow.cli.config import DEFAULT_NEGATIVE_PROMPT, negative_prompt

    for inverter, expected in (("ddim", DEFAULT_NEGATIVE_PROMPT), ("nulltext", "")):
        cfg = _compose(overrides=[f"inverter={inverter}"])
        assert negative_prompt(cfg, build(cfg.inverter)) == expected
    cfg = _compose(overrides=["inverter=nulltext", "negative_prompt=blurry"])
    assert negative_prompt(cfg, build(cfg.inverter)) == "blurry"  # refused later by the editor, with one line


def test_modes_are_checked_by_omegaconf_and_in_python():
    cfg = _compose(overrides=["propagator.blend=papr"])
    with pytest.raises(ConfigError, match="blend"):
        build(cfg.propagator)
    from tokenflow.core.propagation import TokenFlowPropagator

    with pytest.raises(ConfigError, match="propagator.source_features='dirty' is unknown — use one of 'clean', 'propagated'"):
        TokenFlowPropagator(source_features="dirty")


# --- sweeps: every job of every ablation and dataset composes and builds -------------------------


def _sweep_jobs(name, overrides):
    """The jobs (override lists) Hydra's basic sweeper makes of ``overrides`` plus the composed
    hydra.sweeper.params (resolved as when the sweeper is instantiated)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tokenflow.cli.config import register_sweep_resolvers

    register_sweep_resolvers()
    with initialize_config_module(config_module="tokenflow.conf", version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(lines), None)
    return [job for batch in batches for job in batch]


ABLATIONS = [e for e in GROUPS["experiment"] if e.startswith("ablation_")]
KNOBS = {"ablation_stride": "keyframe_stride", "ablation_baseline": "propagator", "ablation_blend": "propagator.blend",
         "ablation_stages": "propagator.stages", "ablation_search": "search", "ablation_pnp": "editor.pnp_f_t",
         "ablation_inversion": "inverter.n_steps", "ablation_editor": "editor",
         "ablation_propagation": "propagator.blend"}


def test_every_knob_has_an_ablation():
    assert set(KNOBS) == set(ABLATIONS), "an ablation file without a test entry, or one missing"


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_every_ablation_job_composes_and_builds(experiment):
    """Each ablation is a real sweep (>= 2 jobs differing in its knob) whose every job composes with any video and
    prompt, resolves, and builds every part; a bad value (unknown stage, editor, blend) fails here."""
    base = [f"experiment={experiment}", "video=clip.mp4", "prompt=a fox", "n_steps=10"]
    jobs = _sweep_jobs("edit", base)
    assert len(jobs) >= 2
    knob = KNOBS[experiment]
    values = set()
    for job in jobs:
        cfg = _compose("edit", [*base, *job])
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["video"] == "clip.mp4" and resolved["prompt"] == "a fox"  # composes with any input
        for group in ("inverter", "editor", "propagator", "keyframes", "search"):
            if group == "search" and cfg.search._target_.endswith("Faiss" + "NeighbourSearch"):
                pytest.importorskip("faiss")
            build(cfg[group])
        value = OmegaConf.select(cfg, f"{knob}._target_" if knob in ("propagator", "editor", "search") else knob)
        values.add(json.dumps(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value))
    assert len(values) >= 2, f"the jobs of {experiment} do not differ in {knob}: {values}"


def test_inversion_ablation_follows_the_runs_steps():
    jobs = _sweep_jobs("edit", ["experiment=ablation_inversion", "video=x.mp4", "n_steps=3"])
    assert sorted(int(j[0].split("=")[1]) for j in jobs) == [3, 6, 15, 30]
    for job in jobs:  # every value is a multiple of the editing grid, so each inverter keeps its latents
        cfg = _compose("edit", ["experiment=ablation_inversion", "n_steps=3", *job])
        assert cfg.inverter.keep_steps == 3 and cfg.inverter.n_steps % 3 == 0


def test_stages_ablation_propagates_only_the_named_stages(tiny):
    """Each job of the stages ablation propagates exactly the tiny UNet's self-attention layers of its stages."""
    from tokenflow.core.propagation import PropagationInputs
    from tokenflow.models.layout import UNetLayout

    layout = UNetLayout.from_unet(tiny.unet)
    prefix = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}
    seen = []
    for job in _sweep_jobs("edit", ["experiment=ablation_stages", "video=x.mp4"]):
        prop = build(_compose("edit", ["experiment=ablation_stages", *job]).propagator)
        prop.prepare(PropagationInputs(model=None, inversion=None, timesteps=[], keyframes=[], latent_hw=(8, 8),
                                       layout=layout))
        stages = None if prop.config.stages is None else sorted(s.value for s in prop.config.stages)
        expected = {n for n in layout.self_attention if stages is None or any(n.startswith(prefix[s]) for s in stages)}
        assert expected and {n for n in layout.self_attention if prop.propagates(n)} == expected
        seen.append(stages)
    assert seen == [None, ["up"], ["mid", "up"], ["down"]]


# --- dataset manifests --------------------------------------------------------------------------


def test_dataset_manifest_expands_to_item_x_prompt_runs():
    jobs = _sweep_jobs("edit", ["dataset=davis_sample"])
    assert [j[0] for j in jobs] == ["item=wolf/0", "item=wolf/1", "item=wolf-8/0"]
    from tokenflow.cli.dataset import apply_item

    cfg = _compose("edit", ["dataset=davis_sample", "item=wolf/1", "height=128"])
    applied = apply_item(cfg, {"height", "item", "dataset"})
    assert applied == {"video": "sample", "prompt": "a red fox", "inversion_prompt": "a wolf", "width": 64,
                       "n_frames": 4}  # height was given on the command line: it wins
    assert (cfg.prompt, cfg.height, cfg.width, cfg.n_frames) == ("a red fox", 128, 64, 4)
    assert cfg.inverter.n_steps == cfg.n_steps  # interpolations still follow the run keys


@pytest.mark.parametrize("manifest, message", [
    ({"items": []}, "no `items:` list"),
    ({"items": [{"video": "a.mp4"}]}, r"items\[0\]"),
    ({"items": [{"video": "a.mp4", "prompts": []}]}, "at least one non-empty prompt"),
    ({"items": [{"video": "a.mp4", "prompts": ["x"], "size": [100, 64]}]}, "multiples of 64"),
    ({"items": [{"video": "a.mp4", "prompts": ["x"]}, {"video": "b/a.mp4", "prompts": ["y"]}]},
     "a second item named 'a'"),
    ({"items": [{"video": "a.mp4", "prompts": ["x"], "colour": 1}]}, "colour"),
    ({"items": [{"video": "a.mp4", "prompts": ["x"]}], "videos": []}, "unknown key 'videos'"),
])
def test_bad_manifests_fail_with_one_line_naming_the_entry(manifest, message):
    from tokenflow.cli.dataset import load_dataset

    with pytest.raises(ConfigError, match=message) as info:
        load_dataset(manifest)
    assert "\n" not in str(info.value)


def test_dataset_runs_and_root():
    from tokenflow.cli.dataset import load_dataset

    ds = load_dataset({"root": "/data", "items": [{"video": "clips/a.mp4", "prompts": ["x", "y"], "size": 128},
                                                  {"name": "s", "video": "sample", "prompts": ["z"]}]})
    assert ds.runs() == ["a/0", "a/1", "s/0"]
    item, k = ds.run("a/1")
    assert item.settings(k, ds.root) == {"video": "/data/clips/a.mp4", "prompt": "y", "height": 128, "width": 128}
    assert ds.run("s/0")[0].settings(0, ds.root) == {"video": "sample", "prompt": "z"}
    with pytest.raises(ConfigError, match="item=a/2 is not a run of the dataset"):
        ds.run("a/2")


def test_dataset_and_item_need_each_other():
    from tokenflow.cli.dataset import apply_item

    with pytest.raises(ConfigError, match="add -m"):  # a single run of a whole dataset
        apply_item(_compose("edit", ["dataset=davis_sample"]), set())
    with pytest.raises(ConfigError, match="no dataset is selected"):
        apply_item(_compose("edit", ["item=wolf/0"]), set())
    assert apply_item(_compose("edit"), set()) == {}  # no dataset: nothing changes
