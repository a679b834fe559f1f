"""conf/vae.yaml composes, builds the task from every model source, and trains end to end via run(cfg)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from helpers.config import compose_config
from helpers.models import make_tiny_vae
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from hyperlit.models.loader import TINY_BASE_DIR
from hyperlit.models.tiny import build_tiny
from hyperlit.tasks.vae.build import build, load_task_vae
from hyperlit.vae.export import diffusers_to_ldm, save_diffusers_folder


def compose_vae(*overrides: str):
    return compose_config("vae", list(overrides))


def small_vae(latent_channels: int = 4, **kw) -> AutoencoderKL:
    return make_tiny_vae(seed=1, latent_channels=latent_channels, **kw)


def test_presets_and_tiny_overlay_compose():
    cfg = compose_vae()
    assert cfg.task == "vae" and cfg.model.family == "tiny"
    assert cfg.loss.reconstruction == "l1" and cfg.loss.perceptual.weight == 1.0  # ft_ema
    assert cfg.data.resolution == 64 and cfg.train.max_steps == 40  # conf/vae_model/tiny.yaml
    assert cfg.trainer.max_steps == -1 and cfg.trainer.gradient_clip_val is None
    cfg = compose_vae("vae_loss=ft_mse", "model=sd15")
    assert cfg.loss.reconstruction == "mse" and cfg.loss.perceptual.weight == 0.1
    assert cfg.data.resolution == 256 and cfg.train.optimizer.betas == [0.5, 0.9]  # no overlay for real models


def test_model_tiny_fine_tunes_the_base_vae_and_tiny_random_the_random_one():
    """model=tiny means the pretrained base in this task too (its UNet was trained on this VAE's latents)."""
    base = AutoencoderKL.from_pretrained(TINY_BASE_DIR / "vae")
    vae, source, embedded = load_task_vae(compose_vae())
    assert embedded and source == "the embedded tiny base model"
    assert vae.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in vae.state_dict().items())
    vae, source, embedded = load_task_vae(compose_vae("model.tiny_random=true", "model.seed=3"))
    assert embedded and "model.tiny_random=true, seed 3" in source
    random_vae = build_tiny(3)[1]
    assert all(torch.equal(v, random_vae.state_dict()[k]) for k, v in vae.state_dict().items())
    assert not torch.equal(vae.decoder.conv_out.weight, base.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="model.tiny_random='yes' is not allowed; allowed: true | false"):
        load_task_vae(compose_vae("model.tiny_random=yes"))


def test_real_model_needs_path_and_perceptual_weights(tmp_path):
    with pytest.raises(ValueError, match="model.path is required for model.family=sd15"):
        load_task_vae(compose_vae("model=sd15"))
    vae = small_vae()
    path = tmp_path / "my.vae.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict(), 2).items()}, path)
    cfg = compose_vae(
        "model=sd15", f"model.path={path}", "vae.norm_num_groups=4", f"callbacks.export.dirpath={tmp_path}/x"
    )
    with pytest.raises(ValueError, match="loss.perceptual.weights is not set"):
        build(cfg)
    loaded, source, embedded = load_task_vae(cfg)
    assert not embedded and str(path) in source
    assert loaded.config.scaling_factor == 0.18215  # a single file carries no factor: the family's
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items())
    with pytest.raises(ValueError, match="has 4 latent channels but the config expects 16"):
        load_task_vae(
            compose_vae("model=sd15", f"model.path={path}", "vae.norm_num_groups=4", "vae.latent_channels=16"),
        )


def test_sixteen_channel_diffusers_folder_trains_and_exports(tmp_path):
    vae = small_vae(16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    save_diffusers_folder(vae, tmp_path / "flux-vae")
    cfg = compose_vae(
        "model=sd15", f"model.path={tmp_path}/flux-vae", "vae.latent_channels=16", "vae.use_quant_conv=false",
        "loss.perceptual.weight=0", "data.resolution=32", "data.num_workers=0", "data.batch_size=2",
        "data.val_count=2", "train.max_steps=2", f"callbacks.export.dirpath={tmp_path}/out",
    )  # fmt: skip
    parts = build(cfg)
    module, dm = parts.load_module(), parts.datamodule
    callbacks = [instantiate(cfg.callbacks[name]) for name in ("ema", "export", "fp16_check")]
    assert module.vae.quant_conv is None and module.vae.config.shift_factor == 0.1159
    assert module.lpips is None
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=dm)
    assert module.step == 2
    exported = AutoencoderKL.from_pretrained(tmp_path / "out" / "vae-ft", local_files_only=True)
    assert exported.config.shift_factor == 0.1159 and exported.config.scaling_factor == 0.3611
    assert exported.config.latent_channels == 16 and exported.quant_conv is None
    sd = load_file(tmp_path / "out" / "vae-ft.vae.safetensors")
    assert "quant_conv.weight" not in sd and sd["decoder.conv_in.weight"].shape[1] == 16


@pytest.mark.slow
def test_train_py_run_on_the_embedded_default(tmp_path):
    from hyperlit.runner import build_run, fit

    cfg = compose_vae(
        f"paths.output_dir={tmp_path}", "logger=none", "train.max_steps=3", "data.resolution=32",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "callbacks.export.save_every=0",
        "optimized_metric=train/rec",
    )  # fmt: skip
    built = build_run(cfg)
    value = fit(built, cfg)  # what run(cfg) returns: the metric optimized_metric names
    metrics = built.trainer.callback_metrics
    assert value == pytest.approx(float(metrics["train/rec"])) and value != float(metrics["train/total"])
    out = tmp_path / "vae"
    assert sorted(p.name for p in out.iterdir()) == ["vae-ft", "vae-ft.disc.safetensors", "vae-ft.vae.safetensors"]
    reloaded = AutoencoderKL.from_pretrained(out / "vae-ft", local_files_only=True)
    assert reloaded.config.scaling_factor == 0.18215 and reloaded.config.block_out_channels == [16, 32, 32, 32]


def test_ddp_overrides_for_separate_g_and_d_backward():
    from hyperlit.tasks.vae.build import ddp_overrides

    assert ddp_overrides(compose_vae()) == {}
    assert ddp_overrides(compose_vae("trainer=ddp_cpu")) == {"strategy": "ddp_find_unused_parameters_true"}
    gpu = ddp_overrides(compose_vae("trainer=ddp"))
    assert gpu == {"strategy": "ddp_find_unused_parameters_true", "sync_batchnorm": True}
    assert ddp_overrides(compose_vae("trainer=ddp", "disc.norm=group")) == {
        "strategy": "ddp_find_unused_parameters_true"
    }
