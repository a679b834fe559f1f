"""The TAESD task's build at the door, with the config a user would compose: each check's refusal word for word with
the value and what is allowed, the edge values that are allowed (the largest latent crop, the smallest image
PatchGAN can take, one latent channel), the options that reach the task config, and the data folder found before
the teacher is read and handed to the data module; the VAE task's reader errors and model defaults; train.lr_auto."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.config import compose_config
from helpers.paths import REPO_ROOT
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from hyperlit.callbacks.lr_range import LRAutoOptions
from hyperlit.models.loader import embedded_tiny_vae
from hyperlit.tasks.hypernetwork.build import lr_auto_options_of
from hyperlit.tasks.taesd.build import build, check_factor, check_latent_layout, check_scenes, check_sizes, task_config
from hyperlit.tasks.vae import build as vae_build  # the module, whose reader is replaced once
from hyperlit.tasks.vae.build import load_task_vae, read_vae
from hyperlit.vae.taesd_config import TAESDTaskConfig


def taesd_options(*overrides: str):
    return task_config(compose_config("taesd", list(overrides)))


def refusal(check, *args) -> str:
    with pytest.raises(ValueError) as error:
        check(*args)
    return str(error.value)


def test_latent_channels_one_or_more_and_the_familys_when_null():
    def layout(value, family_channels: int = 4) -> None:
        check_latent_layout(OmegaConf.create({"vae": {"latent_channels": value}}), family_channels)

    for allowed in (1, 4, 16):
        layout(allowed)
    layout(None, 16)
    advice = "is not allowed; use null (the family's) or e.g. 4, 16"
    for value, shown in ((0, "0"), (-4, "-4"), (True, "True"), (1.5, "1.5"), ("4", "'4'")):
        assert refusal(layout, value) == f"vae.latent_channels: {shown} {advice}"
    assert refusal(layout, None, 0) == f"vae.latent_channels: 0 {advice}"  # null takes the family's, checked too


def test_the_latent_crop_fits_the_images_whose_side_it_is_measured_in():
    options = taesd_options("disc.enabled=false")
    check_sizes(options, "64")  # not a number: the data module reports data.resolution
    check_sizes(taesd_options("disc.enabled=false", "taesd.latent_crop=8"), 64)  # 8 cells of 8 px: the whole image
    assert refusal(check_sizes, taesd_options("disc.enabled=false", "taesd.latent_crop=9"), 68) == (
        "taesd.latent_crop: 9 is not allowed with data.resolution=68; use at most 8 (latent cells of 8 px) or null"
    )


def test_patchgan_needs_three_times_two_to_the_n_layers_pixels():
    """n_layers = 3: 24 px; the crop's side is crop x 8 px, the image's is data.resolution."""
    check_sizes(taesd_options("taesd.latent_crop=3"), 64)  # 24 px: just enough
    check_sizes(taesd_options(), 24)
    check_sizes(taesd_options("disc.n_layers=2", "taesd.latent_crop=2"), 64)  # 12 px needed, 16 px given
    tail = "use 24 px or more, or fewer disc.n_layers, or disc.enabled=false"
    assert refusal(check_sizes, taesd_options("taesd.latent_crop=2"), 64) == (
        f"taesd.latent_crop: 2 is not allowed with disc.n_layers=3 (16 px images for D); {tail}"
    )
    assert refusal(check_sizes, taesd_options(), 16) == (
        f"data.resolution: 16 is not allowed with disc.n_layers=3 (16 px images for D); {tail}"
    )
    assert refusal(check_sizes, taesd_options("disc.n_layers=4"), 40) == (
        "data.resolution: 40 is not allowed with disc.n_layers=4 (40 px images for D); use 48 px or more, or fewer "
        "disc.n_layers, or disc.enabled=false"
    )
    # no discriminator, or no decoder for it to judge: no size is needed
    check_sizes(taesd_options("disc.enabled=false"), 16)
    check_sizes(taesd_options("taesd.train_decoder=false"), 16)


def test_extra_scenes_only_on_the_tiny_base():
    check_scenes(taesd_options("taesd.extra_scenes=2"), "tiny")
    check_scenes(taesd_options("taesd.extra_scenes=0"), "sd15")
    assert refusal(check_scenes, taesd_options("taesd.extra_scenes=2"), "sd15") == (
        "taesd.extra_scenes: 2 is not allowed with model.family=sd15 (the scenes are the tiny base's image domain); "
        "use 0 and your own images in data.path"
    )


def test_the_teacher_must_downsample_by_eight():
    def vae(levels: int) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(block_out_channels=[8] * levels))

    check_factor(vae(4), "/models/vae")
    for levels, factor in ((2, 2), (5, 16)):
        assert refusal(check_factor, vae(levels), "/models/vae") == (
            f"the VAE from /models/vae downsamples by {factor}, but TAESD's layout downsamples by 8; use an "
            "SD-family VAE (4 levels)"
        )


def test_train_and_top_level_options_reach_the_task_config():
    options = taesd_options("train.disc_lr=0.0003", "train.grad_clip=1.5", "max_bad_steps=3", "train.max_steps=50")
    assert (options.optimizer.disc_lr, options.optimizer.grad_clip) == (0.0003, 1.5)
    assert (options.max_bad_steps, options.max_steps) == (3, 50)
    unset = taesd_options("~train.max_steps", "max_bad_steps=null")  # the task's own defaults
    assert (unset.max_steps, unset.max_bad_steps) == (TAESDTaskConfig.max_steps, TAESDTaskConfig.max_bad_steps)
    assert (unset.optimizer.disc_lr, unset.optimizer.grad_clip) == (None, None)


def test_the_data_folder_is_found_before_the_teacher_and_handed_to_the_data_module(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as error:
        build(compose_config("taesd", [f"data.path={missing}", "loss.perceptual.weight=0"]))
    assert str(error.value) == f"data.path={missing!r}: not found (looked at {missing}); expected a folder of images"
    (tmp_path / "images").mkdir()
    cached = ["posterior.cache=true", "taesd.extra_scenes=0", "taesd.augment=false", "seed=7"]  # not the recipe
    parts = build(compose_config("taesd", [f"data.path={tmp_path / 'images'}", "loss.perceptual.weight=0", *cached]))
    data = parts.datamodule
    assert (data.path, data.seed, data.fixed_crops) == (str(tmp_path / "images"), 7, True)  # cached: fixed crops
    # a relative folder is resolved once (the working directory, then the repository): the data module keeps the
    # absolute path whatever directory it reads from later; without the posterior cache, crops are drawn anew
    monkeypatch.chdir(tmp_path)
    parts = build(compose_config("taesd", ["data.path=datasets/sample", "loss.perceptual.weight=0",
                                           "posterior.cache=false"]))  # fmt: skip
    assert (parts.datamodule.path, parts.datamodule.fixed_crops) == (str(REPO_ROOT / "datasets" / "sample"), False)


ALLOWED_VAE = "allowed: a diffusers folder or a .safetensors/.ckpt/.pt file"


def test_a_vae_file_that_cannot_be_read_is_one_line_with_the_readers_reason(tmp_path, monkeypatch):
    bad = tmp_path / "vae.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(SafetensorError) as direct:  # what safetensors itself says of the file
        load_file(bad)
    reason = str(direct.value).splitlines()[0]
    with pytest.raises(ValueError) as error:
        read_vae(bad)
    assert str(error.value) == (
        f"model.path={bad}: not a readable VAE or SD checkpoint (SafetensorError: {reason}); {ALLOWED_VAE}"
    )

    def silent(*_args, **_kwargs):
        raise EOFError()  # a reader failing without a message

    monkeypatch.setattr(vae_build, "load_vae", silent)
    with pytest.raises(ValueError) as error:
        read_vae(bad)
    assert str(error.value) == f"model.path={bad}: not a readable VAE or SD checkpoint (EOFError: ); {ALLOWED_VAE}"


def test_a_model_config_without_tiny_random_or_seed_means_the_pretrained_tiny_base():
    cfg = compose_config("vae", ["~model.tiny_random", "~model.seed"])
    vae, source, embedded = load_task_vae(cfg)
    assert (source, embedded) == ("the embedded tiny base model", True)
    reference = embedded_tiny_vae(False, 0)
    assert all(
        torch.equal(a, b) for a, b in zip(vae.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_lr_auto_interpolations_resolve_against_the_run_config():
    """A sweep written with interpolations gets the values they point to, not the `${...}` text (which the options
    would refuse as not a number)."""
    run = OmegaConf.create({"train": {"max_steps": 30, "lr_auto": {"steps_per_rate": "${train.max_steps}"}}})
    assert lr_auto_options_of(run.train) == LRAutoOptions(steps_per_rate=30)
    run = OmegaConf.create({"top": 0.02, "train": {"lr_auto": {"max": "${top}", "count": 3}}})
    assert lr_auto_options_of(run.train) == LRAutoOptions(max=0.02, count=3)


def test_lr_auto_null_or_left_out_gives_the_range_tests_defaults():
    """Before: OmegaConf.to_container({}) raised "Input cfg is not an OmegaConf config object", with no key named."""
    assert lr_auto_options_of(OmegaConf.create({"lr_auto": None})) == LRAutoOptions()
    assert lr_auto_options_of(OmegaConf.create({})) == LRAutoOptions()
    chosen = compose_config("train", ["train.learning_rate=auto", "train.lr_auto.count=5", "train.lr_auto.max=0.01"])
    assert lr_auto_options_of(chosen.train) == LRAutoOptions(max=0.01, count=5)
    for value, message in (
        ({"count": "x"}, "train.lr_auto.count: 'x' is not allowed; use a whole number >= 2"),
        ({"nope": 1}, "train.lr_auto.nope: 'nope' is not allowed; allowed keys: count, max, min, steps_per_rate"),
        (5, "train.lr_auto: 5 is not allowed; use a mapping of min, max, count, steps_per_rate, or null"),
    ):
        assert refusal(lr_auto_options_of, OmegaConf.create({"lr_auto": value})) == message
