"""``run(cfg)``: everything ``python train.py`` does, callable from tests without the Hydra CLI.

Order matters: the whole config is validated before any model weights load ("errors at the door").
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hyperlit import files as formats
from hyperlit.attention import unet_attention_widths
from hyperlit.distributed import RankAgreement, check_launch
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.lr_schedule import A1111Schedule, base_learning_rate, is_a1111_schedule
from hyperlit.tasks.hypernetwork import HypernetworkTask

log = logging.getLogger(__name__)

TASKS = ("hypernetwork", "vae")
_HYPERNET_EXTRA_KEYS = ("name", "init_from")


# Harmless messages from the libraries that would bury hyperlit's own output on every run.
_QUIET = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Your `IterableDataset` has `__len__` defined",
    r"The number of training batches .* is smaller than the logging interval",
)


def run(cfg: DictConfig) -> float | None:
    """Train what ``cfg.task`` names; returns the final training loss (what sweeps optimise)."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    task = cfg.get("task", "hypernetwork")
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not a task; allowed: {', '.join(TASKS)}")
    check_launch(cfg.get("trainer") or {})
    if task == "vae":
        from hyperlit.tasks.vae import run_vae

        return run_vae(cfg)
    return run_hypernetwork(cfg)


def hypernetwork_config(hypernet_cfg: DictConfig) -> HypernetworkConfig:
    fields = OmegaConf.to_container(hypernet_cfg, resolve=True)
    assert isinstance(fields, dict)
    for key in _HYPERNET_EXTRA_KEYS:
        fields.pop(key, None)
    allowed = set(HypernetworkConfig.__dataclass_fields__) | set(_HYPERNET_EXTRA_KEYS)
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"hypernet.{unknown[0]}: not a hypernetwork option; allowed: {', '.join(sorted(allowed))}")
    return HypernetworkConfig(**fields)


def _model_kwargs(model_cfg: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.pop("_target_", None)
    return kwargs


def max_steps_for(cfg: DictConfig) -> int:
    """``train.max_steps``, shortened to where an A1111 schedule string ends (A1111 stops training there)."""
    max_steps = int(cfg.train.max_steps)
    if max_steps <= 0:
        raise ValueError(f"train.max_steps: {max_steps} is not allowed; use a positive number of optimizer steps")
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
    content = formats.read_file(init_from)
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
    content.config = replace(content.config, weight_init=config.weight_init, multiplier=config.multiplier)
    hn = formats.from_file_content(content, source=str(init_from))
    hn.name = name
    return hn


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        if "_target_" not in logger_cfg:
            continue
        kwargs: dict[str, Any] = {}
        if logger_cfg._target_.endswith("WandbLogger") and logger_cfg.get("offline") is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not _wandb_has_credentials()
            kwargs["offline"] = offline
            if offline and os.environ.get("WANDB_MODE") != "disabled":
                log.warning(
                    "wandb: no credentials found, logging offline under %s/wandb; upload later with "
                    "`wandb sync %s/wandb/offline-run-*` (or run `wandb login` first, or use logger=tensorboard)",
                    logger_cfg.save_dir, logger_cfg.save_dir,
                )
        loggers.append(instantiate(logger_cfg, **kwargs))
        log.debug("logger %s ready", key)
    return loggers


def rank_agreement(cfg: DictConfig) -> RankAgreement:
    """Every process must run this config into this output folder (checked once the process group exists)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return RankAgreement(resolved, str(OmegaConf.select(cfg, "paths.output_dir", default=None)))


def build_callbacks(cfg: DictConfig) -> dict[str, L.Callback]:
    return {
        key: instantiate(callback_cfg)
        for key, callback_cfg in (cfg.get("callbacks") or {}).items()
        if callback_cfg is not None and "_target_" in callback_cfg
    }


@dataclass
class HypernetworkRun:
    """Everything a hypernetwork run is made of, built but not yet fitted (tests inspect it)."""

    trainer: L.Trainer
    module: HypernetworkTask
    datamodule: L.LightningDataModule
    loggers: list
    ckpt_path: str | None


def build_hypernetwork_run(cfg: DictConfig) -> HypernetworkRun:
    # --- errors at the door: everything up to instantiate(cfg.model) reads only config and small files ---
    from hyperlit.models import validate_model_config

    config = hypernetwork_config(cfg.hypernet)
    validate_model_config(**_model_kwargs(cfg.model))
    max_steps = max_steps_for(cfg)
    base_learning_rate(cfg.train.learning_rate, max_steps)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    init_from = cfg.hypernet.get("init_from")
    if init_from and not Path(init_from).is_file():
        raise FileNotFoundError(f"hypernet.init_from={init_from}: no such file")
    name = str(cfg.hypernet.get("name") or "hypernetwork")
    datamodule = instantiate(cfg.data, name=name, seed=cfg.seed)
    if hasattr(datamodule, "validate"):
        datamodule.validate()

    L.seed_everything(cfg.seed, workers=True)
    components = instantiate(cfg.model)
    datamodule.encoder = components
    hypernetwork = build_hypernetwork(cfg, config, components.unet)
    log.info(
        "hypernetwork %s: widths %s, %s parameters", hypernetwork.name, hypernetwork.sizes,
        f"{hypernetwork.parameter_count():,}",
    )
    hypernetwork.optional_info = hypernetwork.optional_info or (
        f"trained with hyperlit on {components.checkpoint_name or 'an unnamed model'}"
    )
    module = HypernetworkTask(
        hypernetwork=hypernetwork,
        components=components,
        optimizer=instantiate(cfg.train.optimizer),
        learning_rate=cfg.train.learning_rate,
        lr_scheduler=cfg.train.lr_scheduler,
        lr_warmup_steps=int(cfg.train.lr_warmup_steps),
        max_steps=max_steps,
        min_snr_gamma=cfg.train.min_snr_gamma,
        noise_offset=float(cfg.train.noise_offset),
        prediction_type=cfg.train.prediction_type,
        initial_step=hypernetwork.step,
    )
    loggers = build_loggers(cfg)
    callbacks = [*build_callbacks(cfg).values(), rank_agreement(cfg)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, max_steps=max_steps)
    return HypernetworkRun(trainer, module, datamodule, loggers, ckpt_path)


def fit(run: HypernetworkRun, cfg: DictConfig) -> float | None:
    for logger in run.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    finally:
        _finish_wandb(run.loggers)
    skipped = getattr(run.datamodule, "skipped", None)
    if skipped:
        log.warning("data: skipped or repaired samples by kind: %s", dict(skipped))
    loss = run.trainer.callback_metrics.get("train/loss")
    return float(loss) if loss is not None and math.isfinite(float(loss)) else None


def run_hypernetwork(cfg: DictConfig) -> float | None:
    return fit(build_hypernetwork_run(cfg), cfg)


def _finish_wandb(loggers: list) -> None:
    """Close the wandb run so the next job of a multirun or sweep starts a fresh one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()
