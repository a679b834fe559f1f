"""Typed, validated settings of the VAE-decoder task (built from the Hydra config, usable without Hydra)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hyperlit.options import check_choice, check_min, not_allowed
from hyperlit.vae.discriminator import NORMS
from hyperlit.vae.losses import GAN_LOSSES, RAMPS, RECONSTRUCTION


@dataclass
class PerceptualConfig:
    weight: float = 1.0
    weights: str | None = None  # torchvision-layout VGG16 state dict (features.N.weight)
    lin_weights: str | None = None  # lpips vgg.pth heads; None = the copy torchmetrics bundles
    # Random backbone: True only in tests. "auto" allows it for the embedded tiny model (whose own weights are
    # random) and is an error for any real VAE.
    random_backbone: bool | str = False

    def __post_init__(self) -> None:
        check_min("loss.perceptual.weight", self.weight, 0)
        if self.random_backbone not in (True, False, "auto"):
            raise not_allowed("loss.perceptual.random_backbone", self.random_backbone, "allowed: true, false, auto")


@dataclass
class Fp16FixConfig:
    """``loss.kind=fp16_fix`` (sdxl-vae-fp16-fix method): reproduce the starting decoder, shrink activations."""

    penalty_weight: float = 1.0  # weight of the activation-magnitude penalty against the teacher term
    target: float = 4094.0  # activation peak the penalty pushes below (fp16 max / 8 headroom / 2)
    gain_lr: float = 0.03  # Adam lr of the per-layer log gains (relative weight/bias scaling per step)
    closed_form: bool = True  # first rescale exactly every layer only a normalisation reads (fp16_rescale.py)
    measure_images: int = 64  # training images whose fp32 activation peaks the closed form measures
    train_weights: bool = False  # the fine-tuned layers' weights train too (at train.optimizer.lr), not only gains

    def __post_init__(self) -> None:
        check_min("loss.fp16_fix.penalty_weight", self.penalty_weight, 0)
        check_min("loss.fp16_fix.target", self.target, 0, strict=True)
        check_min("loss.fp16_fix.gain_lr", self.gain_lr, 0, strict=True)
        check_min("loss.fp16_fix.measure_images", self.measure_images, 1)


LOSS_KINDS = ("reconstruction", "fp16_fix")


@dataclass
class LossConfig:
    reconstruction: str = "l1"
    reconstruction_weight: float = 1.0
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    kind: str = "reconstruction"  # reconstruction (+ LPIPS + GAN) | fp16_fix (teacher + activation penalty, no GAN)
    fp16_fix: Fp16FixConfig = field(default_factory=Fp16FixConfig)

    def __post_init__(self) -> None:
        check_choice("loss.kind", self.kind, LOSS_KINDS)
        check_choice("loss.reconstruction", self.reconstruction, RECONSTRUCTION)
        check_min("loss.reconstruction_weight", self.reconstruction_weight, 0)


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
        check_choice("disc.ramp", self.ramp, RAMPS)
        check_choice("disc.loss", self.loss, GAN_LOSSES)
        check_choice("disc.norm", self.norm, NORMS)
        for k in ("start", "warmup_steps", "ramp_steps", "weight", "max_adaptive_weight"):
            check_min(f"disc.{k}", getattr(self, k), 0)


@dataclass
class OptimizerConfig:
    """What the generator/discriminator optimizers share beyond ``train.optimizer`` (a torch optimizer partial)."""

    disc_lr: float | None = None  # None = the generator's lr
    grad_clip: float | None = None  # max global grad norm, applied to G and D separately

    def __post_init__(self) -> None:
        if self.disc_lr is not None:
            check_min("train.disc_lr", self.disc_lr, 0, strict=True)
        if self.grad_clip is not None:
            check_min("train.grad_clip", self.grad_clip, 0, strict=True)


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
    latent_channels: int | None = None  # expected latent channels; None = take the family's / the VAE's

    def __post_init__(self) -> None:
        check_min("train.max_steps", self.max_steps, 1)
        check_min("max_bad_steps", self.max_bad_steps, 1)
