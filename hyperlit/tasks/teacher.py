"""The frozen VAE a distillation run copies (the TAESD task's teacher): where it comes from, checked before it is
read, then read with one clear error per bad file. Also the config helpers such a build needs."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError

from hyperlit.data.paths import resolve_path
from hyperlit.errors import strip_unsafe_advice
from hyperlit.models.family import ModelFamily, get_family
from hyperlit.models.loader import embedded_tiny_vae
from hyperlit.vae.config import PerceptualConfig
from hyperlit.vae.load import check_vae_layout, load_vae
from hyperlit.vae.lpips import LPIPS

log = logging.getLogger(__name__)


def plain(node: Any) -> dict[str, Any]:
    """DictConfig / Mapping / None -> plain dict."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def optimizer_partial(cfg: Any) -> Any:
    """``train.optimizer`` as a partial, tried once on a dummy parameter so a bad lr/betas fails at the door."""
    try:
        factory = instantiate(cfg.train.optimizer)
        factory([torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError, ImportError) as err:
        raise ValueError(f"train.optimizer: {err}") from None
    return factory


@dataclass(frozen=True)
class TeacherSource:
    family: ModelFamily
    path: Path | None  # None: the embedded tiny model
    key: str  # the config key that names it (model.path or model.vae_path)


def teacher_source(cfg: Any) -> TeacherSource:
    """The model family and the checked VAE path; reads no weights."""
    model = plain(cfg.get("model"))
    family = get_family(model.get("family", "tiny"))
    key = "model.vae_path" if model.get("vae_path") else "model.path"  # the VAE the model actually uses
    path = model.get("vae_path") or model.get("path")
    if not path:
        if family.name != "tiny":
            raise ValueError(f"model.path is required for model.family={family.name} (a VAE or SD checkpoint)")
        return TeacherSource(family, None, key)
    where = resolve_path(path, key, "a diffusers folder, a .safetensors/.ckpt/.pt VAE or SD checkpoint")
    return TeacherSource(family, where, key)


@dataclass
class Teacher:
    vae: AutoencoderKL
    source: str  # for messages: which file or model it is
    embedded: bool  # the embedded tiny model (random LPIPS allowed)


def read_vae(path: Path, key: str, **kwargs: Any) -> AutoencoderKL:
    """``load_vae``, with a file that is not what it claims to be reported as bad input naming ``key``."""
    try:
        return load_vae(path, key=key, **kwargs)
    except (ValueError, OSError):
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        reason = strip_unsafe_advice(str(err)).splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{key}={path}: not a readable VAE or SD checkpoint ({type(err).__name__}: {reason}); "
            "allowed: a diffusers folder or a .safetensors/.ckpt/.pt file"
        ) from None


def load_teacher(cfg: Any) -> Teacher:
    """Read the frozen VAE and check it against the config's (or family's) latent layout."""
    src = teacher_source(cfg)
    vcfg, model = plain(cfg.get("vae")), plain(cfg.get("model"))
    if src.path is None:
        tiny_random, seed = model.get("tiny_random", False), int(model.get("seed", 0))
        vae, source = embedded_tiny_vae(tiny_random, seed), "the embedded tiny base model"
        if tiny_random:
            source = f"the random tiny model (model.tiny_random=true, seed {seed})"
        embedded = True
    else:
        factors: dict[str, Any] = {}
        if src.path.is_file():  # single files carry no factors: the family's apply
            factors = {"scaling_factor": src.family.scaling_factor, "shift_factor": src.family.shift_factor or None}
        factors.update({k: vcfg[k] for k in ("scaling_factor", "shift_factor") if vcfg.get(k) is not None})
        groups = int(vcfg.get("norm_num_groups") or 32)
        vae = read_vae(src.path, src.key, norm_num_groups=groups, **factors)
        source, embedded = f"{src.key}={src.path}", False
    expected = vcfg.get("latent_channels") or src.family.latent_channels
    check_vae_layout(vae, int(expected), vcfg.get("use_quant_conv"), source)
    return Teacher(vae, source, embedded)


@dataclass
class Perceptual:
    lpips: LPIPS | None
    is_random: bool  # a random VGG backbone: fine as a loss on the tiny model, never reported as LPIPS


def build_perceptual(pcfg: PerceptualConfig, embedded: bool) -> Perceptual:
    """LPIPS for ``loss.perceptual``; a real VAE needs real VGG16 weights (they cannot be downloaded here)."""
    if pcfg.weight <= 0:
        return Perceptual(None, False)
    random = pcfg.random_backbone is True or (pcfg.random_backbone == "auto" and embedded)
    if pcfg.weights is None and pcfg.random_backbone == "auto" and not embedded:
        raise ValueError(
            "loss.perceptual.weights is not set: a real VAE needs real LPIPS VGG16 weights "
            "(loss.perceptual.weights=/path/to/vgg16.pth), or loss.perceptual.weight=0"
        )
    if pcfg.weights is None and random:
        log.warning("LPIPS uses a RANDOM VGG16 backbone: only for tests and the embedded tiny model")
    weights = lin = None
    if pcfg.weights:
        weights = resolve_path(pcfg.weights, "loss.perceptual.weights", "a VGG16 state dict")
    if pcfg.lin_weights:
        lin = resolve_path(pcfg.lin_weights, "loss.perceptual.lin_weights", "an lpips vgg.pth")
    return Perceptual(LPIPS(weights, lin, random_backbone=random and weights is None), weights is None)


def ddp_overrides(cfg: Any, disc_norm: str) -> dict[str, Any]:
    """Trainer arguments DDP needs when G and D backpropagate separately (each backward leaves the other
    network's weights unused) and a BatchNorm D needs synced statistics on GPUs."""
    trainer = cfg.get("trainer") or {}  # key by key: other trainer keys may need Hydra's runtime to resolve
    strategy = trainer.get("strategy")
    if not (isinstance(strategy, str) and strategy.startswith("ddp")):
        return {}
    out: dict[str, Any] = {}
    if strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        out["strategy"] = f"{strategy}_find_unused_parameters_true"
    on_gpu = trainer.get("accelerator") not in ("cpu", None)  # torch's SyncBatchNorm is GPU-only
    if on_gpu and disc_norm == "batch" and not trainer.get("sync_batchnorm"):
        out["sync_batchnorm"] = True
    return out
