"""Bad input to `python train.py --config-name taesd`: one `hyperlit: error:` line naming the key, exit 2, and for
everything a config can say, before any weights load (every loader replaced by one that fails the test)."""

from __future__ import annotations

import pytest
from helpers.config import QUIET_RUN, compose_config
from helpers.models import make_tiny_vae
from helpers.paths import REPO_ROOT
from helpers.scripts import load_script

from hyperlit import models
from hyperlit.tasks import teacher
from hyperlit.vae.export import save_diffusers_folder

# (overrides, the key the one error line must start with)
CASES = [
    (["taesd.train_encoder=false", "taesd.train_decoder=false"], "taesd.train_encoder"),
    (["taesd.train_encoder=maybe"], "taesd.train_encoder"),
    (["+taesd.train_both=true"], "taesd.train_both"),
    (["taesd.encoder_weight=-1"], "taesd.encoder_weight"),
    (["disc.conditional=2"], "disc.conditional"),
    (["disc.loss=wgan"], "disc.loss"),
    (["loss.reconstruction=l3"], "loss.reconstruction"),
    (["posterior.sample=sometimes"], "posterior.sample"),
    (["vae.latent_channels=0"], "vae.latent_channels"),
    (["data.resolution=16", "taesd.latent_crop=null"], "data.resolution"),  # too small for a 3-layer PatchGAN
    (["taesd.latent_crop=9"], "taesd.latent_crop"),  # larger than the 64 px images
    (["taesd.latent_crop=2"], "taesd.latent_crop"),  # 16 px windows: too small for D
    (["taesd.latent_crop=0"], "taesd.latent_crop"),
    (["taesd.augment=true", "posterior.cache=true"], "taesd.augment"),  # the cache holds unturned images
    (["taesd.augment=yes"], "taesd.augment"),
    (["taesd.extra_scenes=-1"], "taesd.extra_scenes"),
    (["taesd.extra_scenes=1.5"], "taesd.extra_scenes"),
    (["taesd.extra_scenes=2", "posterior.cache=true", "taesd.augment=false"], "taesd.extra_scenes"),  # nothing to cache
    (["taesd.scene_sample_look=2"], "taesd.scene_sample_look"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.path=/nonexistent/images"], "data.path"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.optimizer.lr=-1"], "train.optimizer"),
    (["train.lr_scheduler=exponential"], "train.lr_scheduler"),
    (["train.lr_warmup_steps=-5"], "train.lr_warmup_steps"),
    (["train.lr_warmup_steps=1.5"], "train.lr_warmup_steps"),
    (["train.max_steps=100", "train.lr_warmup_steps=100"], "train.lr_warmup_steps"),  # the warmup never ends
    (["callbacks.export.dtype=int8"], "callbacks.export.dtype"),
    (["callbacks.export.name=../up"], "callbacks.export.name"),
    (["callbacks.ema.decay=1.5"], "callbacks.ema"),
    (["trainer.precision=8-mixed"], "trainer.precision"),
    (["model=sd15"], "model.path"),  # a missing VAE
    (["model=sd15", "model.path=/nonexistent/vae.safetensors"], "model.path"),
    (["model=sdxl", "model.path=/nonexistent/sdxl.safetensors", "model.vae_path=/gone/vae"], "model.vae_path"),
    (["loss.perceptual.weight=0.1", "loss.perceptual.weights=/nonexistent/vgg16.pth"], "loss.perceptual.weights"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path"),
]


@pytest.fixture
def no_weights(monkeypatch):
    """Every way this task reads weights fails the test (an AssertionError is a bug, not bad input)."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_components", refuse)
    monkeypatch.setattr(teacher, "load_vae", refuse)
    monkeypatch.setattr(teacher, "embedded_tiny_vae", refuse)
    monkeypatch.delenv("HYPERLIT_DEBUG", raising=False)


def run_entry(cfg, capsys) -> str:
    entry = load_script(REPO_ROOT / "train.py", "hyperlit_train_entry").entry
    with pytest.raises(SystemExit) as exit_info:
        entry(cfg)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("hyperlit: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(("overrides", "key"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_one_line_before_any_weights_load(overrides, key, tmp_path, no_weights, capsys):
    cfg = compose_config("taesd", [f"paths.output_dir={tmp_path}", *QUIET_RUN, *overrides])
    line = run_entry(cfg, capsys)
    assert line.startswith(f"hyperlit: error: {key}"), line


def test_extra_scenes_are_refused_for_another_family(tmp_path, no_weights, capsys):
    """Procedural scenes are the tiny base's domain: with an SD VAE they are one line, before the VAE is read."""
    (tmp_path / "vae.safetensors").write_bytes(b"never read")
    cfg = compose_config("taesd", [
        f"paths.output_dir={tmp_path}", *QUIET_RUN, "model=sd15", f"model.path={tmp_path}/vae.safetensors",
        "taesd.extra_scenes=2", "posterior.cache=false",
    ])  # fmt: skip
    line = run_entry(cfg, capsys)
    assert line.startswith("hyperlit: error: taesd.extra_scenes: 2 is not allowed with model.family=sd15"), line


def test_sixteen_channels_against_a_four_channel_vae_names_both(tmp_path, capsys):
    """A family/VAE mismatch can only be seen in the file: one line, after reading that VAE alone."""
    save_diffusers_folder(make_tiny_vae(), tmp_path / "vae")
    cfg = compose_config("taesd", [
        f"paths.output_dir={tmp_path}", *QUIET_RUN, "model=sd15", f"model.path={tmp_path}/vae",
        "vae.latent_channels=16", "loss.perceptual.weight=0",
    ])  # fmt: skip
    line = run_entry(cfg, capsys)
    assert "has 4 latent channels but the config expects 16" in line and str(tmp_path / "vae") in line
