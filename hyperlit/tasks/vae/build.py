"""Validate a VAE-decoder run's config and build its parts; the (possibly large) VAE is read last."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors import SafetensorError
from torch import nn

from hyperlit.callbacks.fp16 import Fp16ClosedForm
from hyperlit.data.paths import resolve_path
from hyperlit.errors import strip_unsafe_advice
from hyperlit.models.family import ModelFamily, get_family
from hyperlit.models.loader import embedded_tiny_vae
from hyperlit.options import build_options
from hyperlit.tasks.base import TaskParts
from hyperlit.tasks.optimizer import checked_optimizer
from hyperlit.tasks.teacher import plain
from hyperlit.tasks.vae.module import VAEDecoderTask
from hyperlit.vae.config import VAETaskConfig
from hyperlit.vae.load import check_vae_layout, load_vae
from hyperlit.vae.lpips import LPIPS

log = logging.getLogger(__name__)


def task_config(cfg: Any) -> VAETaskConfig:
    """The option groups validated into dataclasses (one strict builder, one error grammar)."""
    train = plain(cfg.get("train"))
    raw: dict[str, Any] = {
        "max_steps": train.get("max_steps", VAETaskConfig.max_steps),
        "loss": plain(cfg.get("loss")),
        "disc": plain(cfg.get("disc")),
        "optimizer": {k: train[k] for k in ("disc_lr", "grad_clip") if k in train},
        "posterior": plain(cfg.get("posterior")),
    }
    if cfg.get("max_bad_steps") is not None:
        raw["max_bad_steps"] = cfg.get("max_bad_steps")
    return build_options(VAETaskConfig, raw)


def vae_source(cfg: Any) -> tuple[ModelFamily, Path | None]:
    """The model family and the checked ``model.path`` (None: the embedded tiny model); reads no weights."""
    model = plain(cfg.get("model"))
    family = get_family(model.get("family", "tiny"))
    # model.vae_path (e.g. an fp16-fixed SDXL VAE) is the VAE the model uses, so it is the one to fine-tune
    key = "model.vae_path" if model.get("vae_path") else "model.path"
    path = model.get("vae_path") or model.get("path")
    if not path:
        if family.name != "tiny":
            raise ValueError(f"model.path is required for model.family={family.name} (a VAE or SD checkpoint)")
        return family, None
    return family, resolve_path(path, key, "a diffusers folder, a .safetensors/.ckpt/.pt VAE or SD checkpoint")


def read_vae(path: Path, **kwargs: Any) -> nn.Module:
    """``load_vae``, with a file that is not what it claims to be (a bad header, a cut-off zip, foreign pickle)
    reported as bad input naming ``model.path``; torch's advice to load unsafely is never passed on."""
    try:
        return load_vae(path, **kwargs)
    except (ValueError, OSError):
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        reason = strip_unsafe_advice(str(err)).splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"model.path={path}: not a readable VAE or SD checkpoint ({type(err).__name__}: {reason}); "
            "allowed: a diffusers folder or a .safetensors/.ckpt/.pt file"
        ) from None


def load_task_vae(cfg: Any) -> tuple[nn.Module, str, bool]:
    """(vae, where it came from, is the embedded tiny model). Only the VAE is read: a VAE-only file is fine."""
    family, p = vae_source(cfg)
    vcfg = plain(cfg.get("vae"))
    if p is None:
        # what model=tiny means everywhere: the pretrained base, or with model.tiny_random=true the random model
        model = plain(cfg.get("model"))
        tiny_random, seed = model.get("tiny_random", False), int(model.get("seed", 0))
        vae, embedded = embedded_tiny_vae(tiny_random, seed), True
        source = "the embedded tiny base model"
        if tiny_random:
            source = f"the random tiny model (model.tiny_random=true, seed {seed})"
    else:
        # single files carry no factors: the family's apply; a diffusers folder keeps its config's
        factors: dict[str, Any] = {}
        if p.is_file():
            factors = {"scaling_factor": family.scaling_factor, "shift_factor": family.shift_factor or None}
        factors.update({k: vcfg[k] for k in ("scaling_factor", "shift_factor") if vcfg.get(k) is not None})
        groups = vcfg.get("norm_num_groups")  # null: the file's own (hyperlit's exports carry it), else 32
        vae = read_vae(p, norm_num_groups=int(groups) if groups is not None else None, **factors)
        model = plain(cfg.get("model"))
        key = "vae_path" if model.get("vae_path") else "path"
        source, embedded = f"model.{key}={model.get(key)}", False
    expected = vcfg.get("latent_channels") or family.latent_channels
    check_vae_layout(vae, int(expected), vcfg.get("use_quant_conv"), source)
    return vae, source, embedded


def build_perceptual(pcfg: Any, embedded: bool) -> tuple[LPIPS | None, bool]:
    if pcfg.weight <= 0:
        return None, False
    random = pcfg.random_backbone is True or (pcfg.random_backbone == "auto" and embedded)
    if pcfg.weights is None and pcfg.random_backbone == "auto" and not embedded:
        raise ValueError(
            "loss.perceptual.weights is not set: a real VAE needs real LPIPS VGG16 weights "
            "(loss.perceptual.weights=/path/to/vgg16.pth), or loss.perceptual.weight=0"
        )
    if pcfg.weights is None and random:
        log.warning(
            "LPIPS uses a RANDOM VGG16 backbone (loss.perceptual.random_backbone=%s): only for tests "
            "and the embedded tiny model",
            pcfg.random_backbone,
        )
    weights = lin = None
    if pcfg.weights:
        weights = resolve_path(pcfg.weights, "loss.perceptual.weights", "a VGG16 state dict")
    if pcfg.lin_weights:
        lin = resolve_path(pcfg.lin_weights, "loss.perceptual.lin_weights", "an lpips vgg.pth")
    return LPIPS(weights, lin, random_backbone=random and weights is None), weights is None


def ddp_overrides(cfg: Any) -> dict[str, Any]:
    """Trainer arguments DDP needs for this task: G and D backpropagate separately, so each backward leaves the
    other network's weights unused (find_unused_parameters), and a BatchNorm D needs synced statistics."""
    trainer = cfg.get("trainer") or {}  # read key by key: other trainer keys may need Hydra's runtime to resolve
    strategy = trainer.get("strategy")
    if not (isinstance(strategy, str) and strategy.startswith("ddp")):
        return {}
    out: dict[str, Any] = {}
    if strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        out["strategy"] = f"{strategy}_find_unused_parameters_true"
    on_gpu = trainer.get("accelerator") not in ("cpu", None)  # torch's SyncBatchNorm is GPU-only
    if on_gpu and plain(cfg.get("disc")).get("norm", "batch") == "batch" and not trainer.get("sync_batchnorm"):
        out["sync_batchnorm"] = True
    if out:
        log.info("VAE task under DDP: trainer overrides %s", out)
    return out


def build(cfg: DictConfig) -> TaskParts:
    """Everything is validated (and the data folder scanned lazily) before the VAE is read."""
    tcfg = task_config(cfg)
    optimizer = checked_optimizer(cfg.train.optimizer)
    data_path = resolve_path(cfg.data.get("path"), "data.path", "a folder of images")
    datamodule = instantiate(cfg.data, path=str(data_path), fixed_crops=tcfg.posterior.cache, seed=int(cfg.seed))
    # the model path and the LPIPS files are checked before the (possibly large) VAE is read: errors at the door
    embedded = vae_source(cfg)[1] is None
    perceptual, is_random = build_perceptual(tcfg.loss.perceptual, embedded)

    def load_module() -> VAEDecoderTask:
        vae, source, _ = load_task_vae(cfg)
        module = VAEDecoderTask(vae, tcfg, perceptual, perceptual_is_random=is_random, optimizer=optimizer)
        log.info(
            "VAE task: fine-tuning the decoder of %s (encoder frozen, checksum %s)", source,
            module.frozen_checksum[:12],
        )  # fmt: skip
        return module

    def report(module: VAEDecoderTask) -> str | None:
        if module.skipped_steps:
            log.warning("%d training steps were skipped for NaN/inf losses", module.skipped_steps)
        if module.diverged:
            log.error("VAE training stopped early: %s", module.diverged)
        return module.diverged

    callbacks = [Fp16ClosedForm()] if tcfg.loss.kind == "fp16_fix" else []
    return TaskParts(load_module, datamodule, callbacks, trainer_kwargs=ddp_overrides(cfg), report=report)
