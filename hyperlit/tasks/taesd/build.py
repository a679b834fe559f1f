"""Validate a TAESD run's config and build its parts; the frozen VAE (the teacher) is read last."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from hyperlit.data.paths import resolve_path
from hyperlit.options import build_options
from hyperlit.tasks import teacher
from hyperlit.tasks.base import TaskParts
from hyperlit.tasks.taesd.module import TAESDTask
from hyperlit.vae.taesd_config import TAESDTaskConfig

log = logging.getLogger(__name__)

# the downsampling factor madebyollin's layout has (three stride-2 convs), which the teacher must share
TAESD_FACTOR = 8


def task_config(cfg: Any) -> TAESDTaskConfig:
    """The option groups validated into dataclasses (one strict builder, one error grammar)."""
    train = teacher.plain(cfg.get("train"))
    raw: dict[str, Any] = {
        "max_steps": train.get("max_steps", TAESDTaskConfig.max_steps),
        "taesd": teacher.plain(cfg.get("taesd")),
        "loss": teacher.plain(cfg.get("loss")),
        "disc": teacher.plain(cfg.get("disc")),
        "optimizer": {k: train[k] for k in ("disc_lr", "grad_clip", "lr_scheduler", "lr_warmup_steps") if k in train},
        "posterior": teacher.plain(cfg.get("posterior")),
    }
    if cfg.get("max_bad_steps") is not None:
        raw["max_bad_steps"] = cfg.get("max_bad_steps")
    return build_options(TAESDTaskConfig, raw)


def check_latent_layout(cfg: Any, family_channels: int) -> None:
    """A latent width TAESD cannot have is an error before the VAE is read."""
    channels = teacher.plain(cfg.get("vae")).get("latent_channels")
    channels = family_channels if channels is None else channels
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"vae.latent_channels: {channels!r} is not allowed; use null (the family's) or e.g. 4, 16")


def check_sizes(tcfg: TAESDTaskConfig, resolution: Any) -> None:
    """The latent crop fits the images, and PatchGAN's convs fit what the student draws: they need
    3 * 2**n_layers pixels (n_layers stride-2 convs, then two 4x4 convs that shrink by 1)."""
    if not isinstance(resolution, int):
        return  # PixelDataModule reports a bad data.resolution
    crop = tcfg.taesd.latent_crop
    if crop is not None and crop * TAESD_FACTOR > resolution:
        raise ValueError(
            f"taesd.latent_crop: {crop} is not allowed with data.resolution={resolution}; use at most "
            f"{resolution // TAESD_FACTOR} (latent cells of {TAESD_FACTOR} px) or null"
        )
    d = tcfg.disc
    if not (d.enabled and tcfg.taesd.train_decoder):
        return
    side, key = (crop * TAESD_FACTOR, "taesd.latent_crop") if crop is not None else (resolution, "data.resolution")
    need = 3 * 2**d.n_layers
    if side < need:
        value = crop if crop is not None else resolution
        raise ValueError(
            f"{key}: {value} is not allowed with disc.n_layers={d.n_layers} ({side} px images for D); use "
            f"{need} px or more, or fewer disc.n_layers, or disc.enabled=false"
        )


def check_scenes(tcfg: TAESDTaskConfig, family: str) -> None:
    """Procedural scenes are the tiny base's image domain: another family's VAE would learn nothing useful there."""
    if tcfg.taesd.extra_scenes and family != "tiny":
        raise ValueError(
            f"taesd.extra_scenes: {tcfg.taesd.extra_scenes} is not allowed with model.family={family} (the scenes "
            "are the tiny base's image domain); use 0 and your own images in data.path"
        )


def check_factor(vae: Any, source: str) -> None:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != TAESD_FACTOR:
        raise ValueError(
            f"the VAE from {source} downsamples by {factor}, but TAESD's layout downsamples by {TAESD_FACTOR}; "
            "use an SD-family VAE (4 levels)"
        )


def build(cfg: DictConfig) -> TaskParts:
    """Everything is validated (and the data folder found) before the VAE is read."""
    tcfg = task_config(cfg)
    optimizer = teacher.optimizer_partial(cfg)
    source = teacher.teacher_source(cfg)  # model.path checked, nothing read
    check_latent_layout(cfg, source.family.latent_channels)
    check_sizes(tcfg, cfg.data.get("resolution"))
    check_scenes(tcfg, source.family.name)
    data_path = resolve_path(cfg.data.get("path"), "data.path", "a folder of images")
    datamodule = instantiate(cfg.data, path=str(data_path), fixed_crops=tcfg.posterior.cache, seed=int(cfg.seed))
    perceptual = teacher.Perceptual(None, False)
    if tcfg.taesd.train_decoder:
        perceptual = teacher.build_perceptual(tcfg.loss.perceptual, embedded=source.path is None)

    def load_module() -> TAESDTask:
        t = teacher.load_teacher(cfg)
        check_factor(t.vae, t.source)
        module = TAESDTask(t.vae, tcfg, perceptual.lpips, perceptual.is_random, optimizer, seed=int(cfg.seed))
        halves = [n for n, on in (("encoder", tcfg.taesd.train_encoder), ("decoder", tcfg.taesd.train_decoder)) if on]
        log.info(
            "TAESD task: distilling the %s of %s into a tiny autoencoder (%d latent channels, teacher checksum %s)",
            " and ".join(halves), t.source, module.latent_channels, module.teacher_checksum[:12],
        )  # fmt: skip
        return module

    def report(module: TAESDTask) -> str | None:
        if module.skipped_steps:
            log.warning("%d training steps were skipped for NaN/inf losses", module.skipped_steps)
        if module.diverged:
            log.error("TAESD training stopped early: %s", module.diverged)
        return module.diverged

    overrides = teacher.ddp_overrides(cfg, tcfg.disc.norm)
    if overrides:
        log.info("TAESD task under DDP: trainer overrides %s", overrides)
    return TaskParts(load_module, datamodule, trainer_kwargs=overrides, report=report)
