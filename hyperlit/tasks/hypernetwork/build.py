"""Validate a hypernetwork run's config and build its parts; every check that reads no weights comes first."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hyperlit import files
from hyperlit.attention import unet_attention_widths
from hyperlit.callbacks.lr_range import LRAutoOptions, LRRangeTest, is_auto, stored_range_test
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.lr_schedule import A1111Schedule, base_learning_rate, is_a1111_schedule
from hyperlit.models import ModelSpec, validate_model_config
from hyperlit.options import build_options, not_allowed
from hyperlit.tasks.base import TaskParts
from hyperlit.tasks.hypernetwork.module import PREDICTION_TYPES, HypernetworkTask
from hyperlit.tasks.optimizer import checked_optimizer

log = logging.getLogger(__name__)

# Keys of the hypernet group that name the run rather than the network's architecture.
HYPERNET_EXTRA_KEYS = ("name", "init_from")


def hypernetwork_config(hypernet_cfg: DictConfig) -> HypernetworkConfig:
    fields = OmegaConf.to_container(hypernet_cfg, resolve=True)
    assert isinstance(fields, dict)
    return build_options(HypernetworkConfig, fields, "hypernet.", ignore=HYPERNET_EXTRA_KEYS)


def max_steps_for(cfg: DictConfig) -> int:
    """``train.max_steps``, shortened to where an A1111 schedule string ends (A1111 stops training there)."""
    max_steps = int(cfg.train.max_steps)
    if max_steps <= 0:
        raise not_allowed("train.max_steps", max_steps, "use a positive number of optimizer steps")
    if is_a1111_schedule(cfg.train.learning_rate):
        schedule = A1111Schedule.parse(str(cfg.train.learning_rate), max_steps)
        if schedule.total_steps < max_steps:
            log.info("the learning-rate schedule %r ends training at step %d", schedule.text, schedule.total_steps)
        return schedule.total_steps
    return max_steps


def resolve_sizes(config: HypernetworkConfig, unet: Any) -> list[int]:
    """``auto`` -> the cross widths then the self widths the UNet uses (A1111 order: 768, 320, 640, 1280)."""
    widths = unet_attention_widths(unet)
    used = widths["cross"] + [w for w in widths["self"] if w not in widths["cross"]]
    if config.sizes == "auto":
        return used
    unused = [w for w in config.sizes if w not in used]
    if unused:
        warnings.warn(
            f"hypernet.sizes: widths {unused} are not used by this model's attention (it uses {used}); their "
            "modules will not train",
            stacklevel=2,
        )
    return list(config.sizes)


def build_hypernetwork(cfg: DictConfig, config: HypernetworkConfig, unet: Any) -> Hypernetwork:
    name = str(cfg.hypernet.get("name") or "hypernetwork")
    init_from = cfg.hypernet.get("init_from")
    if not init_from:
        return Hypernetwork(config, sizes=resolve_sizes(config, unet), name=name)
    content = files.read_file(init_from)
    problems = [
        f"hypernet.{field}: the config says {ours!r}, the file has {theirs!r}"
        for field, ours, theirs in (
            ("layer_structure", config.layer_structure, content.config.layer_structure),
            ("activation", config.activation, content.config.activation),
            ("activate_output", config.activate_output, content.config.activate_output),
            ("layer_norm", config.layer_norm, content.config.layer_norm),
            ("dropout_structure", config.dropout_probabilities(), content.config.dropout_probabilities()),
        )
        if ours != theirs
    ]
    widths = unet_attention_widths(unet)
    used = set(widths["cross"]) | set(widths["self"])
    unused = [w for w in content.layers if w not in used]
    if unused:
        problems.append(f"widths {unused} of the file are not used by this model (it uses {sorted(used)})")
    if config.sizes != "auto" and sorted(config.sizes) != sorted(content.layers):
        problems.append(f"hypernet.sizes: the config says {config.sizes}, the file has {list(content.layers)}")
    if problems:
        raise ValueError(
            f"hypernet.init_from={init_from}: the file does not fit this run:\n  - " + "\n  - ".join(problems)
        )
    # this run's training options win over the file's
    content.config = replace(
        content.config,
        weight_init=config.weight_init,
        multiplier=config.multiplier,
        input_noise=config.input_noise,
    )
    hn = files.from_file_content(content, source=str(init_from))
    hn.name = name
    return hn


def model_kwargs(model_cfg: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.pop("_target_", None)
    return kwargs


def lr_auto_options_of(train: DictConfig) -> LRAutoOptions:
    """``train.lr_auto`` for learning_rate=auto; an A1111 schedule string keeps its own rates (auto is one rate)."""
    node = train.get("lr_auto")
    if node is None:  # null or left out: the range test's defaults
        fields = {}
    elif isinstance(node, DictConfig):  # a mapping inside a DictConfig is always one
        fields = OmegaConf.to_container(node, resolve=True)
    else:
        raise not_allowed("train.lr_auto", node, "use a mapping of min, max, count, steps_per_rate, or null")
    return build_options(LRAutoOptions, fields, "train.lr_auto.")


def check_train_options(train: DictConfig) -> None:
    """The objective's options, checked here too so a bad one is reported before the model loads."""
    if train.prediction_type is not None and train.prediction_type not in PREDICTION_TYPES:
        raise not_allowed(
            "train.prediction_type", train.prediction_type, "allowed: null, " + ", ".join(PREDICTION_TYPES)
        )
    if train.min_snr_gamma is not None and not float(train.min_snr_gamma) > 0:
        raise not_allowed("train.min_snr_gamma", train.min_snr_gamma, "use null or a number > 0")
    if float(train.noise_offset) < 0:
        raise not_allowed("train.noise_offset", train.noise_offset, "use 0 or more")
    check_timestep_range(train.get("min_timestep", 0), train.get("max_timestep"))
    for key in ("gradient_checkpointing", "compile"):
        if not isinstance(train.get(key, False), bool):
            raise not_allowed(f"train.{key}", train.get(key), "use true or false")


def check_timestep_range(low: Any, high: Any, schedule_length: int | None = None) -> None:
    """train.min_timestep / max_timestep: whole numbers with 0 <= min < max <= the schedule's length (known once the
    model's scheduler has loaded; before that, only the rest is checked)."""
    for key, value in (("train.min_timestep", low), ("train.max_timestep", high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise not_allowed(key, value, "use a whole number of timesteps" + (" or null" if "max" in key else ""))
    if low is None or low < 0:
        raise not_allowed("train.min_timestep", low, "use 0 or more")
    if high is not None and high <= low:
        raise not_allowed("train.max_timestep", high, f"use more than train.min_timestep ({low}), or null")
    if schedule_length is None:
        return
    if high is not None and high > schedule_length:
        raise not_allowed("train.max_timestep", high, f"use at most {schedule_length} (this model's schedule) or null")
    if low >= schedule_length:
        raise not_allowed("train.min_timestep", low, f"use less than {schedule_length} (this model's schedule)")


def native_size(data_cfg: DictConfig, spec: ModelSpec) -> dict[str, int]:
    """``data.resolution: null`` -> the model's native size, decided from the config before any weights load."""
    if data_cfg.get("resolution", 0) is not None:
        return {}
    resolution = spec.family.native_resolution(spec.prediction_type)
    log.info("data.resolution: %d, the native size of model.family=%s", resolution, spec.family.name)
    return {"resolution": resolution}


def build(cfg: DictConfig) -> TaskParts:
    """Everything up to ``instantiate(cfg.model)`` reads only config and small files (errors at the door)."""
    config = hypernetwork_config(cfg.hypernet)
    spec = validate_model_config(**model_kwargs(cfg.model))
    max_steps = max_steps_for(cfg)
    auto = is_auto(cfg.train.learning_rate)
    lr_auto_options = lr_auto_options_of(cfg.train) if auto else None
    if not auto:
        base_learning_rate(cfg.train.learning_rate, max_steps)
    check_train_options(cfg.train)
    init_from = cfg.hypernet.get("init_from")
    if init_from and not Path(init_from).is_file():
        raise FileNotFoundError(f"hypernet.init_from={init_from}: no such file")
    name = str(cfg.hypernet.get("name") or "hypernetwork")
    datamodule = instantiate(cfg.data, name=name, seed=cfg.seed, **native_size(cfg.data, spec))
    if hasattr(datamodule, "validate"):
        datamodule.validate()
    # lr comes from train.learning_rate (a number, `auto` or an A1111 schedule string), as the module fills it in
    optimizer = checked_optimizer(cfg.train.optimizer, lr=("train.learning_rate", 1.0e-3))
    learning_rate, lr_auto, callbacks = cfg.train.learning_rate, None, []
    if lr_auto_options is not None:
        if not hasattr(datamodule, "sweep_batches"):
            raise not_allowed("train.learning_rate", "auto", "the range test needs a folder's images (data=folder or "
                              "data=sample); with streamed shards give a number")  # fmt: skip
        if not cfg.data.get("val_count"):
            raise not_allowed("train.learning_rate", "auto", "each rate is scored by val/loss on held-out images: "
                              "set data.val_count >= 1, or give a number")  # fmt: skip
        if cfg.get("ckpt_path"):  # resumed: the rate the first run's sweep chose, no second sweep
            lr_auto = stored_range_test(cfg.ckpt_path)
            learning_rate = lr_auto["rate"]
            log.info("train.learning_rate=auto: %.3g, chosen when this run started (%s)", learning_rate, cfg.ckpt_path)
        else:
            validation = (cfg.get("callbacks") or {}).get("validation") or {}
            callbacks.append(
                LRRangeTest(
                    lr_auto_options, int(validation.get("timesteps", 8)), int(cfg.seed), str(cfg.paths.output_dir)
                )
            )

    def load_module() -> HypernetworkTask:
        components = instantiate(cfg.model)
        check_timestep_range(
            cfg.train.get("min_timestep", 0), cfg.train.get("max_timestep"),
            components.noise_scheduler.config.num_train_timesteps,
        )  # fmt: skip
        datamodule.encoder = components
        hypernetwork = build_hypernetwork(cfg, config, components.unet)
        log.info(
            "hypernetwork %s: widths %s, %s parameters", hypernetwork.name, hypernetwork.sizes,
            f"{hypernetwork.parameter_count():,}",
        )  # fmt: skip
        hypernetwork.optional_info = hypernetwork.optional_info or (
            f"trained with hyperlit on {components.checkpoint_name or 'an unnamed model'}"
        )
        module = HypernetworkTask(
            hypernetwork=hypernetwork,
            components=components,
            optimizer=optimizer,
            learning_rate=learning_rate,
            lr_scheduler=cfg.train.lr_scheduler,
            lr_warmup_steps=int(cfg.train.lr_warmup_steps),
            max_steps=max_steps,
            min_snr_gamma=cfg.train.min_snr_gamma,
            noise_offset=float(cfg.train.noise_offset),
            min_timestep=int(cfg.train.get("min_timestep", 0)),
            max_timestep=cfg.train.get("max_timestep"),
            prediction_type=cfg.train.prediction_type,
            initial_step=hypernetwork.step,
            gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing", False)),
            compile=bool(cfg.train.get("compile", False)),
            lr_auto=lr_auto,
        )
        return module

    return TaskParts(load_module, datamodule, callbacks=callbacks, trainer_kwargs={"max_steps": max_steps})
