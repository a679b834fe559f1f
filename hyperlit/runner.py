"""THE runner: what every ``python train.py`` run does, whichever task ``cfg.task`` names.

Order matters ("errors at the door"): the task's ``build`` validates its config and builds the parts that read no
weights; then loggers, the config's callbacks and the Trainer (all through ``hydra.utils.instantiate``); only then
does the task read the model weights.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hyperlit.callbacks.requeue import RequeueAtStepBoundary
from hyperlit.config_keys import CONF_DIR, check_keys_are_read, defined_keys
from hyperlit.cpu_threads import apply_threads, choose_threads, runs_on_cpu
from hyperlit.distributed import RankAgreement, check_launch, init_elastic_process_group, slurm_environment
from hyperlit.metrics_file import MetricsFile
from hyperlit.quiet import drop_lightning_tips, drop_wandb_anonymous
from hyperlit.resume import ConfigInCheckpoint, resolved_config, resume_path
from hyperlit.summary import run_summary
from hyperlit.tasks import TASKS
from hyperlit.tasks.base import TaskParts

log = logging.getLogger(__name__)

# Harmless messages from the libraries that would bury hyperlit's own output on every run.
QUIET = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Your `IterableDataset` has `__len__` defined",
    r"The number of training batches .* is smaller than the logging interval",
    r"Found \d+ module\(s\) in eval mode",  # frozen parts (LPIPS, the VAE encoder) are in eval mode on purpose
)


def run(cfg: DictConfig) -> float | None:
    """Train what ``cfg.task`` names; returns the metric ``cfg.optimized_metric`` names (what sweeps optimise)."""
    return fit(build_run(cfg), cfg)


@dataclass
class Run:
    """Everything a run is made of, built but not yet fitted (tests inspect it)."""

    trainer: pl.Trainer
    module: pl.LightningModule
    parts: TaskParts
    loggers: list
    metrics: MetricsFile | None = None  # metrics.csv + loss.png in the run dir, whatever the logger

    @property
    def datamodule(self) -> pl.LightningDataModule:
        return self.parts.datamodule

    @property
    def ckpt_path(self) -> str | None:
        return self.parts.ckpt_path


def build_run(cfg: DictConfig) -> Run:
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    drop_lightning_tips()
    check_keys_are_read(cfg, defined_keys(config_dirs()))
    task = cfg.get("task", "hypernetwork")
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not allowed; allowed: {', '.join(TASKS)}")
    check_launch(cfg.get("trainer") or {})
    family = OmegaConf.select(cfg, "model.family", default=None)
    apply_threads(choose_threads(cfg.get("cpu_threads", "auto"), runs_on_cpu(cfg.get("trainer")), family))
    ckpt_path = resume_path(cfg)  # a file, `last` or (under SLURM) null: checked against the config it was saved with
    # verbose=False: Lightning's "Seed set to N" line would precede a bad-input error, which must be the only line
    pl.seed_everything(int(cfg.get("seed") or 0), workers=True, verbose=False)
    parts = TASKS[task](cfg)
    parts.ckpt_path = ckpt_path
    loggers = build_loggers(cfg)
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None)
    metrics = MetricsFile(output_dir) if output_dir else None
    callbacks = [*parts.callbacks, *build_callbacks(cfg).values(), rank_agreement(cfg)]
    callbacks.append(ConfigInCheckpoint(resolved_config(cfg)))
    kwargs = dict(parts.trainer_kwargs)
    slurm = slurm_environment()
    if slurm is not None:  # SIGUSR1: HPC checkpoint at the step's end, then `scontrol requeue`
        kwargs["plugins"] = [slurm]
        callbacks.append(RequeueAtStepBoundary(slurm))
    every_logger = [*loggers, *([metrics] if metrics else [])]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=every_logger or False, **kwargs)
    # Only now, with every part validated and the Trainer accepted, are the model weights read.
    return Run(trainer, parts.load_module(), parts, loggers, metrics)


def config_dirs() -> list[Path]:
    """The folders this run's config was composed from (the repository's conf/ when Hydra is not running)."""
    if not HydraConfig.initialized():
        return [CONF_DIR]
    sources = HydraConfig.get().runtime.config_sources
    return [Path(s.path) for s in sources if s.schema == "file" and Path(s.path).is_dir()] or [CONF_DIR]


def fit(run: Run, cfg: DictConfig) -> float | None:
    for logger in run.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    init_elastic_process_group(run.trainer.strategy)  # torchrun restarts: a store namespace per attempt
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    finally:
        finish_wandb(run.loggers)
    # One report of bad input for every task: data modules count skipped/repaired samples by kind in `skipped`.
    skipped = getattr(run.datamodule, "skipped", None)
    if skipped:
        log.warning("data: skipped or repaired samples by kind: %s", dict(skipped))
    if run.trainer.is_global_zero:
        output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None)
        for line in run_summary(run.trainer, run.metrics, Path(output_dir) if output_dir else None):
            log.info("summary: %s", line)
    if run.parts.report(run.module) is not None:
        return None  # the task says the result is unusable (e.g. it diverged); it has logged why
    name = str(cfg.get("optimized_metric") or "train/loss")
    metric = run.trainer.callback_metrics.get(name)
    if metric is None and name == "val/loss":
        # No held-out data (data.val_count=0, or the validation callback is off): sweeps get the training loss.
        log.info("optimized_metric: val/loss was not computed in this run; returning train/loss")
        metric = run.trainer.callback_metrics.get("train/loss")
    return float(metric) if metric is not None and math.isfinite(float(metric)) else None


def wandb_has_credentials() -> bool:
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
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        kwargs: dict[str, Any] = {}
        if logger_cfg._target_.endswith("WandbLogger") and logger_cfg.get("offline") is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_has_credentials()
            kwargs["offline"] = offline
            if offline and os.environ.get("WANDB_MODE") != "disabled":
                log.warning(
                    "wandb: no credentials found, logging offline under %s/wandb; upload later with "
                    "`wandb sync %s/wandb/offline-run-*` (or run `wandb login` first, or use logger=tensorboard)",
                    logger_cfg.save_dir, logger_cfg.save_dir,
                )  # fmt: skip
        logger = instantiate(logger_cfg, **kwargs)
        drop_wandb_anonymous(logger)
        loggers.append(logger)
        log.debug("logger %s ready", key)
    return loggers


def build_callbacks(cfg: DictConfig) -> dict[str, pl.Callback]:
    """The config's ``callbacks`` group, in config order (``callbacks.<name>=null`` turns one off)."""
    return {
        key: instantiate(callback_cfg)
        for key, callback_cfg in (cfg.get("callbacks") or {}).items()
        if callback_cfg is not None and "_target_" in callback_cfg
    }


def rank_agreement(cfg: DictConfig) -> RankAgreement:
    """Every process must run this config into this output folder (checked once the process group exists)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return RankAgreement(resolved, str(OmegaConf.select(cfg, "paths.output_dir", default=None)))


def finish_wandb(loggers: list) -> None:
    """Close the wandb run so the next job of a multirun or sweep starts a fresh one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb  # only when a wandb logger exists: importing wandb is slow

        wandb.finish()
