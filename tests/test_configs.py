"""Every file in conf/ composes, and its `_target_`s point at real classes or functions."""

from __future__ import annotations

import importlib

import pytest
from helpers.config import compose_config
from helpers.paths import CONF_DIR
from omegaconf import DictConfig, ListConfig, OmegaConf

from hyperlit.files import comfyui, to_file_content
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.tasks.hypernetwork.build import hypernetwork_config

TOP_LEVEL = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("templates",))
GROUP_OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]


def _targets(node, path=""):
    if isinstance(node, DictConfig):
        for key in node.keys():
            if key == "_target_":
                yield path, node[key]
            else:
                yield from _targets(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _targets(item, f"{path}[{i}]")


def _resolve_target(target: str):
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        owner_name, _, cls = module_name.rpartition(".")
        return getattr(getattr(importlib.import_module(owner_name), cls), attr)


def _overrides_for(group: str, option: str) -> list[str]:
    overrides = [f"{group}={option}"]
    if group == "model" and option != "tiny":
        overrides.append("model.path=/models/x.safetensors")
    if group == "data" and option == "folder":
        overrides.append("data.path=/data/style")
    return overrides


@pytest.mark.parametrize("config_name", TOP_LEVEL)
def test_top_level_configs_compose(config_name):
    cfg = compose_config(config_name, ["paths.output_dir=/tmp/x"])
    assert cfg.task in ("hypernetwork", "vae", "taesd")
    for where, target in _targets(cfg):
        assert callable(_resolve_target(target)), f"{config_name}: {where} -> {target}"


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}/{o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group, option):
    if (group, option) == ("hparams_search", "optuna"):  # the optional `sweep` extra provides its sweeper
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hparams_search=optuna needs the sweep extra")
    # vae_* groups belong to conf/vae.yaml, taesd_* to conf/taesd.yaml
    config_name = next((name for name in ("vae", "taesd") if group.startswith(f"{name}_")), "train")
    cfg = compose_config(config_name, ["paths.output_dir=/tmp/x", *_overrides_for(group, option)])
    # Resolving proves every interpolation points somewhere.
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    for where, target in _targets(cfg):
        assert callable(_resolve_target(target)), f"{group}/{option}: {where} -> {target}"


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "hypernet").glob("*.yaml")))
def test_hypernet_presets_are_valid_configs(option):
    cfg = compose_config("train", [f"hypernet={option}", "paths.output_dir=/tmp/x"])
    config = hypernetwork_config(cfg.hypernet)
    assert isinstance(config, HypernetworkConfig)
    assert cfg.hypernet.name == option  # output files are named after the preset unless overridden
    verdict = comfyui.verdict(to_file_content(Hypernetwork(config, sizes=[8])))
    # every shipped preset computes the same function in A1111 and ComfyUI, except that ComfyUI keeps Dropout active
    # (those runs also write <name>.comfyui.pt, which does)
    assert verdict.same_function or verdict.reason == comfyui.DROPOUT_REASON, verdict.reason
    stripped = HypernetworkConfig(**{**config.to_dict(), "dropout_structure": None})
    assert comfyui.verdict(to_file_content(Hypernetwork(stripped, sizes=[8]))).same_function


def test_novelai_preset_is_the_original_layout():
    config = hypernetwork_config(compose_config("train", ["hypernet=linear_121", "paths.output_dir=/x"]).hypernet)
    assert (config.layer_structure, config.activation, config.layer_norm, config.dropout_structure) == (
        [1, 2, 1],
        "linear",
        False,
        None,
    )


def test_unknown_hypernet_key_is_named():
    cfg = compose_config("train", ["+hypernet.actvation=relu", "paths.output_dir=/x"])
    with pytest.raises(ValueError, match="hypernet.actvation: 'actvation' is not allowed; allowed keys: .*init_from"):
        hypernetwork_config(cfg.hypernet)


def test_demo_recipe_applies_to_the_embedded_demo_only():
    """conf/recipe/sample_tiny.yaml sets the demo's measured recipe (batch 6, 2e-3 x 2000, no dropout) for data=sample x
    model=tiny only; the rest is the family's, and a user's folder gets the family's 3e-3 x 2500 with dropout 0.5."""
    demo = compose_config("train", [])
    assert (demo.train.learning_rate, demo.train.max_steps, demo.data.tag_dropout) == (2e-3, 2000, 0.1)
    assert demo.train.min_timestep == 250 and demo.data.batch_size == 6
    assert demo.callbacks.ema.enabled and demo.callbacks.ema.decay == 0.99 and demo.hypernet.dropout_structure is None
    folder = compose_config("train", ["data=folder", "data.path=/d"])  # a user's folder on the tiny base
    assert (folder.train.learning_rate, folder.train.max_steps, folder.data.batch_size) == (3e-3, 2500, 4)
    assert folder.callbacks.ema.decay == 0.99 and folder.hypernet.dropout_structure == 0.5
    real = compose_config("train", ["model=sd15", "model.path=/m.safetensors", "data=folder", "data.path=/d"])
    assert (real.train.learning_rate, real.train.max_steps, real.data.tag_dropout) == (5e-5, 3000, 0.0)
    assert real.train.min_timestep == 0 and real.data.batch_size == 1  # A1111: every timestep, one image a step
    assert not real.callbacks.ema.enabled  # A1111 writes the last step's weights
    assert real.hypernet.dropout_structure is None  # A1111's "Use dropout" is off by default
    # a command-line override still wins over the recipe
    tuned = compose_config("train", ["data.tag_dropout=0.0", "train.max_steps=5"])
    assert (tuned.data.tag_dropout, tuned.train.max_steps) == (0.0, 5)
