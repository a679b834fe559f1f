"""The VAE task's evaluation parts: validation scores the starting decoder beside the trained one, the colour check
after training, and the `vae_loss=fp16_fix` preset making an fp16-unsafe decoder safe."""

from __future__ import annotations

import copy
import logging

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

from hyperlit.callbacks.fp16 import FP16Check
from hyperlit.data.pixeldatamodule import PixelDataModule
from hyperlit.models.tiny import build_tiny
from hyperlit.tasks.vae.build import task_config
from hyperlit.tasks.vae.module import VAEDecoderTask, frozen_checksum
from hyperlit.vae.config import DiscConfig, LossConfig, PerceptualConfig, PosteriorConfig, VAETaskConfig
from hyperlit.vae.fp16 import FP16_MAX, decode_report, fp16_decode_report, fp16_verdict
from hyperlit.vae.fp16_fix import make_fp16_unsafe


def images(tmp_path, n=4, size=32):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):  # smooth colour gradients: something a decoder can keep
        yy, xx = np.mgrid[0:size, 0:size] / size
        arr = np.stack([xx, yy, (xx + yy) / 2 * rng.random()], -1) * 255
        Image.fromarray(arr.astype(np.uint8)).save(d / f"{i:02d}.png")
    return d


def fit(task, tmp_path, callbacks=(), val_every=2):
    dm = PixelDataModule(str(images(tmp_path)), resolution=32, batch_size=2, val_count=2, fixed_crops=True)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=None,
        val_check_interval=val_every, limit_val_batches=1, callbacks=list(callbacks), default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)
    return trainer, dm


def test_validation_scores_the_starting_decoder_and_checks_colours(tmp_path, caplog) -> None:
    cfg = VAETaskConfig(
        max_steps=2,
        loss=LossConfig("l1", 1.0, PerceptualConfig(weight=0.0)),
        disc=DiscConfig(enabled=False),
        posterior=PosteriorConfig(cache=False, sample=False),
    )
    vae = build_tiny(0)[1]
    start = copy.deepcopy(vae).eval()
    task = VAEDecoderTask(vae, cfg, None, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    with caplog.at_level(logging.INFO):
        trainer, dm = fit(task, tmp_path)
    metrics = trainer.callback_metrics
    x = next(iter(dm.val_dataloader()))["pixels"]
    with torch.no_grad():
        y = start.decode(start.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    expected = peak_signal_noise_ratio((y + 1) / 2, (x + 1) / 2, data_range=1.0)
    assert float(metrics["val/start_psnr"]) == pytest.approx(float(expected), abs=1e-4)
    assert float(metrics["val/psnr"]) != pytest.approx(float(expected), abs=1e-3)  # the trained one moved
    assert {"val/start_ssim", "val/saturation_ratio", "val/contrast_ratio", "val/colour_shift"} <= set(metrics)
    # the random tiny decoder's colours are far off: the check after training says so
    assert task.colour_check is not None and task.colour_check.warnings
    assert "colour check of the last validation: the decoder" in caplog.text
    assert not any(k.startswith("start_decoder.") for k in task.state_dict() if k.startswith(("vae.", "disc.")))
    assert not any(p.requires_grad for p in task.start_decoder.parameters())


def test_fp16_fix_preset_composes_and_validates() -> None:
    cfg = compose_config("vae", ["vae_loss=fp16_fix"])
    tcfg = task_config(cfg)
    assert tcfg.loss.kind == "fp16_fix" and tcfg.loss.perceptual.weight == 0
    assert tcfg.loss.fp16_fix.target * 16 <= FP16_MAX
    with pytest.raises(ValueError, match="loss.fp16_fix.gain_lr: 0"):
        task_config(compose_config("vae", ["vae_loss=fp16_fix", "loss.fp16_fix.gain_lr=0"]))
    with pytest.raises(ValueError, match="loss.kind: 'teacher' is not allowed"):
        task_config(compose_config("vae", ["+loss.kind=teacher"]))


@pytest.mark.slow
def test_fp16_fix_task_makes_an_unsafe_decoder_safe(tmp_path) -> None:
    torch.manual_seed(0)
    vae = build_tiny(0)[1]
    z = torch.randn(2, 4, 4, 4)
    peak = fp16_verdict(decode_report(vae, z, torch.float32)).peak
    make_fp16_unsafe(vae, 4 * FP16_MAX / peak)
    assert not fp16_verdict(fp16_decode_report(vae, z)).finite
    with torch.no_grad():
        teacher = vae.decode(z).sample
    cfg = VAETaskConfig(
        max_steps=300,
        loss=LossConfig(perceptual=PerceptualConfig(weight=0.0), kind="fp16_fix"),
        posterior=PosteriorConfig(cache=True, sample=True),
    )
    task = VAEDecoderTask(vae, cfg, None)
    encoder = frozen_checksum(task.vae)
    assert task.disc is None
    fp16 = FP16Check()
    trainer, _ = fit(task, tmp_path, [fp16], val_every=100)
    assert task.step == 300 and frozen_checksum(task.vae) == encoder
    assert all(s.safe for s in fp16.stats)
    verdict = fp16_verdict(fp16_decode_report(task.vae, z))
    assert verdict.well_below, verdict
    with torch.no_grad():
        half = copy.deepcopy(task.vae).half().decode(z.half()).sample.float()
    a, b = (half.clamp(-1, 1) + 1) / 2, (teacher.clamp(-1, 1) + 1) / 2
    assert float(-10 * torch.log10(((a - b) ** 2).mean())) >= 30.0
    assert "train/activation_penalty" in trainer.callback_metrics
