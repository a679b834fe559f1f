"""VAE-decoder task: gradient flow of every term, frozen encoder, training, export, EMA, resume, NaN guard."""

from __future__ import annotations

import copy
import logging

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from helpers.models import make_tiny_vae
from helpers.vae_reference import generator_loss as reference_generator_loss
from PIL import Image
from safetensors.torch import load_file

from hyperlit.callbacks.ema import EMA
from hyperlit.callbacks.fp16 import FP16Check
from hyperlit.callbacks.vae_export import VAEExport
from hyperlit.data.pixeldatamodule import PixelDataModule
from hyperlit.data.pixels import ImageCrops
from hyperlit.tasks.vae.module import VAEDecoderTask, frozen_checksum
from hyperlit.vae.config import DiscConfig, LossConfig, PerceptualConfig, PosteriorConfig, VAETaskConfig
from hyperlit.vae.fp16 import fp16_decode_report
from hyperlit.vae.lpips import LPIPS


def make_task(seed: int = 0, vae_seed: int | None = None, **overrides) -> VAEDecoderTask:
    cfg = VAETaskConfig(
        max_steps=overrides.pop("max_steps", 4),
        loss=LossConfig("l1", 1.0, PerceptualConfig(weight=1.0, random_backbone=True)),
        disc=DiscConfig(start=0, warmup_steps=0, ramp_steps=0, ndf=8, n_layers=2),
        posterior=PosteriorConfig(cache=True, sample=True),
        **overrides,
    )
    torch.manual_seed(seed + 100)
    vae = make_tiny_vae(seed if vae_seed is None else vae_seed)
    return VAEDecoderTask(vae, cfg, LPIPS(random_backbone=True), perceptual_is_random=True)


def images(tmp_path, n=6, size=32):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):
        arr = (rng.random((size, size + 8 * (i % 2), 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:02d}.png")
    return d


def batch(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.rand(b, 3, size, size, generator=g) * 2 - 1, "index": torch.arange(b)}


def grads(module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


# ---------------------------------------------------------------- gradient flow


@pytest.mark.parametrize("term", ["rec", "lpips", "gan"])
def test_each_generator_term_moves_the_decoder_only(term):
    task = make_task()
    x = batch()["pixels"]
    mean, logvar = task.posterior(x)
    x_hat = task.decode(task.latents(mean, logvar))
    if term == "rec":
        loss = torch.nn.functional.l1_loss(x_hat, x)
    elif term == "lpips":
        loss = task.lpips(x, x_hat).mean()
    else:
        from hyperlit.vae.frozen import frozen
        from hyperlit.vae.losses import generator_loss

        with frozen(task.disc):
            loss = generator_loss(task.disc(x_hat), "hinge")
    loss.backward()
    for m in task.trainable_modules():
        assert all(g is not None and g.abs().sum() > 0 for g in grads(m)[-2:]), term
    assert task.vae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert task.vae.post_quant_conv.weight.grad.abs().sum() > 0
    assert all(g is None for g in grads(task.vae.encoder)) and task.vae.quant_conv.weight.grad is None
    assert all(g is None for g in grads(task.disc)), "the G step must not touch D"
    assert all(p.requires_grad for p in task.disc.parameters()), "D's requires_grad restored after the G step"


def test_full_generator_loss_has_adaptive_gan_term_and_no_d_grads():
    task = make_task()
    task.disc.eval()  # BatchNorm running stats must not move between the two evaluations below
    x = batch()["pixels"]
    z = task.posterior(x)[0]
    x_hat = task.decode(z)
    total, logs = reference_generator_loss(task, x, x_hat)  # reference: LDM's autograd at conv_out.weight
    expected = logs["nll"] + logs["d_weight"] * logs["g_loss"]
    assert torch.allclose(total, expected)
    assert logs["d_weight"] > 0 and logs["lpips"] > 0
    assert torch.allclose(logs["d_weight"], 0.5 * logs["grad_norm_rec"] / (logs["grad_norm_gan"] + 1e-4))
    total.backward()
    assert all(g is None for g in grads(task.disc))
    ref = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad(set_to_none=True)

    # the training path: dL/dx_hat once through LPIPS and D, norms from conv_out's weight-gradient formula
    x_hat = task.decode(z)
    g_out, fast = task.generator_output_grad(x, x_hat)
    assert not g_out.requires_grad  # the adaptive weight is a constant, as in LDM (detached)
    for k in ("grad_norm_rec", "grad_norm_gan", "d_weight", "total"):
        assert torch.allclose(fast[k], logs[k], rtol=1e-4), k
    (x_hat * g_out).sum().backward()
    got = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    assert set(got) == set(ref) and all(n.startswith(("vae.decoder.", "vae.post_quant_conv.")) for n in got)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-7), n


def test_discriminator_step_does_not_touch_the_decoder():
    task = make_task()
    x = batch()["pixels"]
    x_hat = task.decode(task.posterior(x)[0])
    d_loss, logs = task.disc_loss(x, x_hat)
    d_loss.backward()
    # every D weight learns (the head's bias gets +1/N from fakes and -1/N from reals: exactly 0 for hinge)
    assert all(p.grad is not None for p in task.disc.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in task.disc.named_parameters() if n.endswith("weight"))
    assert all(g is None for m in task.trainable_modules() for g in grads(m))
    assert 0.0 <= logs["d_acc"] <= 1.0


def test_no_adversarial_term_before_warmup_ends():
    task = make_task()
    task.config.disc = DiscConfig(start=2, warmup_steps=3, ramp_steps=2, ndf=8, n_layers=2)
    x = batch()["pixels"]
    x_hat = task.decode(task.posterior(x)[0])
    task.step = 4
    total, logs = reference_generator_loss(task, x, x_hat)
    assert "g_loss" not in logs and torch.equal(total, logs["nll"])
    task.step = 5
    _, logs = reference_generator_loss(task, x, x_hat)
    assert logs["adv_factor"].item() == 0.5


def test_posterior_is_cached_once_per_image():
    task = make_task()
    calls = []
    encode = task.vae.encode
    task.vae.encode = lambda px: calls.append(px.shape[0]) or encode(px)
    b = batch(3)
    m1, _ = task.posterior(b["pixels"], b["index"])
    m2, _ = task.posterior(b["pixels"] * 0, b["index"])  # cached: the pixels are not looked at again
    assert calls == [3] and torch.equal(m1, m2)
    b2 = {"pixels": b["pixels"], "index": torch.tensor([2, 5, 6])}
    task.posterior(b2["pixels"], b2["index"])
    assert calls == [3, 2]


def test_missing_perceptual_model_is_a_clear_error():
    with pytest.raises(ValueError, match="loss.perceptual.weight=1.0 needs an LPIPS model"):
        VAEDecoderTask(make_tiny_vae(), VAETaskConfig(), None)


# ---------------------------------------------------------------- end to end


def fit(task, tmp_path, dm, callbacks=(), ckpt_path=None):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=2,
        limit_val_batches=1,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def datamodule(tmp_path):
    return PixelDataModule(str(images(tmp_path)), resolution=32, batch_size=2, val_count=2, fixed_crops=True)


def test_end_to_end_training_exports_and_keeps_encoder(tmp_path, caplog):
    task = make_task(max_steps=4)
    enc_before = frozen_checksum(task.vae)
    dec_before = task.vae.decoder.conv_out.weight.detach().clone()
    disc_before = [p.detach().clone() for p in task.disc.parameters()]
    ema = EMA(decay=0.5, warmup=False)
    export = VAEExport(str(tmp_path / "out"), name="tiny", save_every=2)
    fp16 = FP16Check()
    with caplog.at_level(logging.INFO):
        trainer = fit(task, tmp_path, datamodule(tmp_path), [ema, export, fp16])

    assert task.step == 4 and trainer.global_step == 8  # G and D each count one optimizer step
    assert frozen_checksum(task.vae) == enc_before == task.frozen_checksum
    assert not torch.equal(task.vae.decoder.conv_out.weight, dec_before)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, task.disc.parameters(), strict=True))
    assert ema.num_updates == 4
    assert not torch.equal(ema.shadow["vae.decoder.conv_out.weight"], task.vae.decoder.conv_out.weight)
    assert {"val/psnr", "val/ssim"} <= set(trainer.callback_metrics)
    assert "train/d_weight" in trainer.callback_metrics and "val/lpips_vgg" not in trainer.callback_metrics

    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([
        "tiny", "tiny.vae.safetensors", "tiny.disc.safetensors",
        "tiny-2", "tiny-2.vae.safetensors", "tiny-2.disc.safetensors",
        "tiny-4", "tiny-4.vae.safetensors", "tiny-4.disc.safetensors",
    ])  # fmt: skip
    # the exported weights are the EMA weights, in the LDM layout diffusers converts strictly
    sd = load_file(tmp_path / "out" / "tiny.vae.safetensors")
    assert torch.equal(sd["decoder.conv_out.weight"], ema.shadow["vae.decoder.conv_out.weight"])
    conf = AutoencoderKL.load_config(tmp_path / "out" / "tiny")
    fresh = AutoencoderKL.from_config(conf)
    fresh.load_state_dict(convert_ldm_vae_checkpoint(sd, conf), strict=True)
    assert torch.equal(fresh.encoder.conv_in.weight, task.vae.encoder.conv_in.weight)
    assert fp16.stats is not None and all(s.safe for s in fp16.stats)
    assert "fp16 decode check passed" in caplog.text


def test_resume_restores_disc_optimizers_ema_and_step(tmp_path):
    dm = datamodule(tmp_path)
    task = make_task(max_steps=3)
    ema = EMA(decay=0.9)
    fit(task, tmp_path, dm, [ema]).save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert not any(k.startswith(("vae.encoder.", "vae.quant_conv.", "lpips.")) for k in ckpt["state_dict"])
    assert any(k.startswith("disc.") for k in ckpt["state_dict"]) and len(ckpt["optimizer_states"]) == 2
    assert ckpt["vae_task"]["step"] == 3

    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module):
            seen["step"] = module.step
            seen["conv_out"] = module.vae.decoder.conv_out.weight.detach().clone()
            seen["disc"] = {k: v.clone() for k, v in module.disc.state_dict().items()}
            seen["opt_d"] = copy.deepcopy(trainer.optimizers[1].state_dict())
            seen["shadow"] = {k: v.clone() for k, v in EMA.find(trainer).shadow.items()}

    resumed = make_task(seed=7, vae_seed=0, max_steps=5)  # same base VAE, different D init
    with torch.no_grad():
        resumed.vae.decoder.conv_out.weight.add_(1.0)  # the decoder must come from the checkpoint too
    ema2 = EMA(decay=0.9)
    fit(resumed, tmp_path, dm, [ema2, Probe()], ckpt_path=tmp_path / "a.ckpt")
    assert seen["step"] == 3 and resumed.step == 5
    assert torch.equal(seen["conv_out"], ckpt["state_dict"]["vae.decoder.conv_out.weight"])
    for k, v in ckpt["state_dict"].items():
        if k.startswith("disc."):
            assert torch.equal(seen["disc"][k[5:]], v), k
    saved_d = ckpt["optimizer_states"][1]["state"]
    assert all(torch.equal(seen["opt_d"]["state"][i]["exp_avg"], saved_d[i]["exp_avg"]) for i in saved_d)
    saved_shadow = ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "EMA" in k)]["shadow"]
    assert all(torch.equal(seen["shadow"][k], v) for k, v in saved_shadow.items())
    assert ema2.num_updates == 5


def test_resume_against_a_different_encoder_is_refused(tmp_path):
    dm = datamodule(tmp_path)
    task = make_task(max_steps=1)
    fit(task, tmp_path, dm).save_checkpoint(tmp_path / "a.ckpt")
    other = make_task(max_steps=2)
    with torch.no_grad():
        other.vae.encoder.conv_in.weight.add_(1.0)
    other.frozen_checksum = frozen_checksum(other.vae)
    with pytest.raises(ValueError, match="different base VAE encoder"):
        fit(other, tmp_path, dm, ckpt_path=tmp_path / "a.ckpt")


def test_nan_losses_are_skipped_then_training_stops(tmp_path, caplog):
    task = make_task(max_steps=50, max_bad_steps=3)
    before = task.vae.decoder.conv_out.weight.detach().clone()

    class NaNCrops(ImageCrops):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["pixels"][:] = float("nan")
            return item

    class NaNData(PixelDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.train_set.__class__ = NaNCrops

    dm = NaNData(str(images(tmp_path)), resolution=32, batch_size=2, val_count=2, fixed_crops=False)
    export = VAEExport(str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING):
        fit(task, tmp_path, dm, [export])
    assert task.skipped_steps == 3 and task.step == 0
    assert task.diverged is not None and "last good checkpoint: none saved yet" in task.diverged
    assert torch.equal(task.vae.decoder.conv_out.weight, before)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- fp16 check


def test_fp16_report_flags_overflowing_blocks(tiny_vae):
    vae = tiny_vae
    z = torch.randn(1, 4, 8, 8)
    ok = fp16_decode_report(vae, z)
    assert [s.name for s in ok][:3] == ["post_quant_conv", "decoder.conv_in", "decoder.mid_block"]
    assert all(s.safe for s in ok) and all(s.max_abs > 0 for s in ok)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations far beyond fp16's 65504
    bad = {s.name: s for s in fp16_decode_report(vae, z)}
    assert not bad["decoder.conv_in"].safe and bad["decoder.conv_in"].nonfinite > 0
    assert vae.decoder.conv_in.weight.dtype == torch.float32  # the check used a copy
