"""Typed, validated settings of the VAE-decoder task (built from the Hydra config, usable without Hydra)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, TypeVar, get_type_hints

from hyperlit.vae.discriminator import NORMS
from hyperlit.vae.losses import GAN_LOSSES, RAMPS, RECONSTRUCTION


def _check(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not supported; allowed: {', '.join(allowed)}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{key}={value} must be >= 0")


@dataclass
class PerceptualConfig:
    weight: float = 1.0
    weights: str | None = None  # torchvision-layout VGG16 state dict (features.N.weight)
    lin_weights: str | None = None  # lpips vgg.pth heads; None = the copy torchmetrics bundles
    # Random backbone: True only in tests. "auto" allows it for the embedded tiny model (whose own weights are
    # random) and is an error for any real VAE.
    random_backbone: bool | str = False

    def __post_init__(self) -> None:
        _non_negative("loss.perceptual.weight", self.weight)
        if self.random_backbone not in (True, False, "auto"):
            raise ValueError(
                f"loss.perceptual.random_backbone={self.random_backbone!r}; allowed: true, false, auto"
            )


@dataclass
class LossConfig:
    reconstruction: str = "l1"
    reconstruction_weight: float = 1.0
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)

    def __post_init__(self) -> None:
        _check("loss.reconstruction", self.reconstruction, RECONSTRUCTION)
        _non_negative("loss.reconstruction_weight", self.reconstruction_weight)


@dataclass
class DiscConfig:
    enabled: bool = True
    start: int = 0  # the task's own step at which D starts training
    warmup_steps: int = 0  # D-only steps before G's adversarial term starts
    ramp_steps: int = 0  # then G's adversarial factor rises 0 -> 1 over this many steps
    ramp: str = "linear"
    weight: float = 0.5  # LDM kl-f8 disc_weight
    loss: str = "hinge"
    adaptive: bool = True  # adaptive weight from last-layer gradient norms; False = fixed `weight`
    max_adaptive_weight: float = 1e4
    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"

    def __post_init__(self) -> None:
        _check("disc.ramp", self.ramp, RAMPS)
        _check("disc.loss", self.loss, GAN_LOSSES)
        _check("disc.norm", self.norm, NORMS)
        for k in ("start", "warmup_steps", "ramp_steps", "weight", "max_adaptive_weight"):
            _non_negative(f"disc.{k}", getattr(self, k))


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    disc_lr: float | None = None  # None = lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max global grad norm, applied to G and D separately

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.lr <= 0 or (self.disc_lr is not None and self.disc_lr <= 0):
            raise ValueError(f"optimizer.lr={self.lr} / optimizer.disc_lr={self.disc_lr} must be > 0")


@dataclass
class PosteriorConfig:
    cache: bool = True  # encode each (fixed-crop) image once and reuse the posterior
    sample: bool = True  # sample z ~ N(mean, std) each step (what the UNet was trained on); False = the mode


@dataclass
class VAETaskConfig:
    max_steps: int = 200  # the task's own steps (one G update and at most one D update each)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    max_bad_steps: int = 10  # consecutive NaN/inf steps before training stops
    log_images_every_val: bool = True
    latent_channels: int | None = None  # expected latent channels; None = take the family's / the VAE's

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps={self.max_bad_steps} must be >= 1")


T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build a (nested) dataclass from a plain mapping; unknown keys are an error naming the key."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}; allowed: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if is_dataclass(hint) and isinstance(value, Mapping):
            value = from_mapping(hint, value, f"{prefix}{name}.")
        kwargs[name] = value
    return cls(**kwargs)
