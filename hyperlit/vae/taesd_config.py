"""Typed, validated settings of the TAESD distillation task (``conf/taesd.yaml``), usable without Hydra."""

from __future__ import annotations

from dataclasses import dataclass, field

from hyperlit.lr_schedule import SCHEDULER_NAMES
from hyperlit.options import check_choice, check_min, not_allowed
from hyperlit.vae.config import DiscConfig, OptimizerConfig, PerceptualConfig, PosteriorConfig
from hyperlit.vae.losses import RECONSTRUCTION


def check_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise not_allowed(key, value, "allowed: true, false")


@dataclass
class DistillConfig:
    """``taesd:`` which halves learn, and how much the encoder's latent error counts."""

    train_encoder: bool = True  # tiny encoder -> the frozen encoder's latents (UNet scale), MSE
    train_decoder: bool = True  # tiny decoder -> the frozen decoder's images from the same latents
    encoder_weight: float = 1.0  # weight of the encoder's latent MSE in the generator loss
    # The student learns on a random window of this many latent cells of each teacher-encoded/decoded image (None:
    # the whole image): the teacher sees whole images, the student (whose receptive field is bounded) a cheap crop.
    latent_crop: int | None = None
    # Each training image turned by a random one of the 8 flips / quarter turns and its RGB channels permuted before
    # the teacher sees it: 48 variants per image, each labelled exactly by the teacher, so a small data set teaches
    # the teacher's function rather than its images (needs posterior.cache=false).
    augment: bool = False
    # This many procedural scenes of the tiny base's domain (hyperlit.tasks.taesd.scenes) appended to each training
    # batch, new ones every step: unlimited distinct images for the teacher to label (needs posterior.cache=false).
    extra_scenes: int = 0
    scene_sample_look: float = 1.0  # share of those scenes in the sample set's look; the rest in the base's

    def __post_init__(self) -> None:
        if self.latent_crop is not None and (
            not isinstance(self.latent_crop, int) or isinstance(self.latent_crop, bool) or self.latent_crop < 1
        ):
            raise not_allowed("taesd.latent_crop", self.latent_crop, "use null (whole images) or an integer >= 1")
        check_bool("taesd.train_encoder", self.train_encoder)
        check_bool("taesd.train_decoder", self.train_decoder)
        check_bool("taesd.augment", self.augment)
        if not isinstance(self.extra_scenes, int) or isinstance(self.extra_scenes, bool) or self.extra_scenes < 0:
            raise not_allowed("taesd.extra_scenes", self.extra_scenes, "use a whole number >= 0 (0: none)")
        share = self.scene_sample_look
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise not_allowed("taesd.scene_sample_look", share, "use a share from 0 to 1 (e.g. 0.5)")
        check_min("taesd.encoder_weight", self.encoder_weight, 0)
        if not (self.train_encoder or self.train_decoder):
            raise ValueError(
                "taesd.train_encoder: false is not allowed together with taesd.train_decoder=false; "
                "at least one half must train"
            )


@dataclass
class DecoderLossConfig:
    """``loss:`` the decoder's distance to the frozen decoder's image (the GAN term is in ``disc``)."""

    reconstruction: str = "mse"
    reconstruction_weight: float = 1.0
    perceptual: PerceptualConfig = field(default_factory=lambda: PerceptualConfig(weight=0.1))

    def __post_init__(self) -> None:
        check_choice("loss.reconstruction", self.reconstruction, RECONSTRUCTION)
        check_min("loss.reconstruction_weight", self.reconstruction_weight, 0)


@dataclass
class TAESDDiscConfig(DiscConfig):
    # TAESD's decoder is a GAN conditioned on the latents: D sees the image with the latents upsampled beside it
    conditional: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("disc.conditional", self.conditional)


@dataclass
class TAESDOptimizerConfig(OptimizerConfig):
    """``train:`` the VAE task's optimizer extras and the generator's learning-rate schedule (train.yaml's keys)."""

    # diffusers' schedules (hyperlit.lr_schedule.build_scheduler), stepped once per generator update; D keeps its rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0  # linear warmup from 0 over this many generator updates

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("train.lr_scheduler", self.lr_scheduler, SCHEDULER_NAMES)
        if not isinstance(self.lr_warmup_steps, int) or isinstance(self.lr_warmup_steps, bool):
            raise not_allowed("train.lr_warmup_steps", self.lr_warmup_steps, "use a whole number >= 0")
        check_min("train.lr_warmup_steps", self.lr_warmup_steps, 0)


@dataclass
class TAESDTaskConfig:
    max_steps: int = 200  # the task's own steps (one generator update and at most one D update each)
    taesd: DistillConfig = field(default_factory=DistillConfig)
    loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    disc: TAESDDiscConfig = field(default_factory=TAESDDiscConfig)
    optimizer: TAESDOptimizerConfig = field(default_factory=TAESDOptimizerConfig)
    posterior: PosteriorConfig = field(default_factory=lambda: PosteriorConfig(cache=True, sample=True))
    max_bad_steps: int = 10  # consecutive NaN/inf steps before training stops

    def __post_init__(self) -> None:
        check_min("train.max_steps", self.max_steps, 1)
        check_min("max_bad_steps", self.max_bad_steps, 1)
        if self.optimizer.lr_warmup_steps >= self.max_steps:
            raise not_allowed(
                "train.lr_warmup_steps",
                self.optimizer.lr_warmup_steps,
                f"use fewer than train.max_steps={self.max_steps} (the warmup would never finish)",
            )
        check_bool("posterior.cache", self.posterior.cache)
        check_bool("posterior.sample", self.posterior.sample)
        if self.taesd.augment and self.posterior.cache:
            raise ValueError(
                "taesd.augment: true is not allowed with posterior.cache=true (a cached posterior is the unturned "
                "image's); set posterior.cache=false"
            )
        if self.taesd.extra_scenes and self.posterior.cache:
            raise ValueError(
                f"taesd.extra_scenes: {self.taesd.extra_scenes} is not allowed with posterior.cache=true (the scenes "
                "are new every step, there is nothing to cache); set posterior.cache=false or taesd.extra_scenes=0"
            )
