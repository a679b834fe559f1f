"""The TAESD task's parts called directly, each against a reference computed another way: the decoder's loss
gradient and LDM's adaptive weight against autograd through the whole decoder, D's loss and accuracy written out,
the noise, crops and conditioning rebuilt by hand, the refusals word for word, the checkpoint's contents, and one
training step on a stand-in trainer (what is skipped, stepped, counted and stopped)."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from helpers.config import compose_config
from helpers.paths import REPO_ROOT
from PIL import Image

from hyperlit.demo.shapes import SAMPLE_CHECKER_DARK
from hyperlit.models.loader import embedded_tiny_vae
from hyperlit.tasks.taesd import module as taesd_module
from hyperlit.tasks.taesd import scenes
from hyperlit.tasks.taesd.build import build, task_config
from hyperlit.tasks.taesd.module import TAESDTask, teacher_checksum
from hyperlit.vae.config import PerceptualConfig, PosteriorConfig
from hyperlit.vae.frozen import weights_checksum
from hyperlit.vae.losses import adversarial_factor
from hyperlit.vae.lpips import LPIPS
from hyperlit.vae.taesd_config import (
    DecoderLossConfig,
    DistillConfig,
    TAESDDiscConfig,
    TAESDOptimizerConfig,
    TAESDTaskConfig,
)

SCALING, SHIFT = 0.5, 0.25


def make_vae(seed: int = 0, channels: int = 4, shift: float | None = SHIFT) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=4, latent_channels=channels,
        scaling_factor=SCALING, shift_factor=shift,
    )  # fmt: skip


def config(
    *, enc: bool = True, dec: bool = True, perceptual: float = 0.0, sample: bool = True, **kw
) -> TAESDTaskConfig:
    disc = {
        "start": 0,
        "warmup_steps": 0,
        "ramp_steps": 0,
        "ndf": 8,
        "n_layers": 1,
        "norm": "none",
        **kw.pop("disc", {}),
    }
    return TAESDTaskConfig(
        max_steps=kw.pop("max_steps", 5),
        taesd=DistillConfig(enc, dec, **kw.pop("taesd", {})),
        loss=DecoderLossConfig(kw.pop("rec", "mse"), kw.pop("rec_weight", 1.0), PerceptualConfig(weight=perceptual)),
        disc=TAESDDiscConfig(**disc),
        optimizer=kw.pop("optimizer", TAESDOptimizerConfig()),
        posterior=PosteriorConfig(cache=False, sample=sample),
        **kw,
    )


def make_task(cfg: TAESDTaskConfig, vae=None, lpips=None, seed: int = 3) -> TAESDTask:
    torch.manual_seed(11)
    return TAESDTask(vae if vae is not None else make_vae(), cfg, lpips, False, None, seed=seed)


def pixels(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------- the parts


def test_the_parts_a_task_builds_from_its_config():
    vae = make_vae().double().train()
    task = make_task(config(), vae)
    assert task.vae is vae and not vae.training and next(vae.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in vae.parameters())
    assert task.teacher_checksum == weights_checksum(vae) == teacher_checksum(vae)
    assert (task.latent_channels, task.scaling, task.shift) == (4, SCALING, SHIFT)
    assert make_task(config(), make_vae(shift=None)).shift == 0.0
    assert not task.automatic_optimization and not task.strict_loading
    assert (task.step, task.skipped_steps, task.bad_in_a_row, task.diverged, task.seed) == (0, 0, 0, None, 3)
    trained = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trained == {f"taesd.{n}" for n, _ in task.taesd.named_parameters()} | {
        f"disc.{n}" for n, _ in task.disc.named_parameters()
    }
    assert task.disc.main[0].in_channels == 3 + 4  # conditional D: the latents beside the image
    assert task.last_layer is task.taesd.decoder.layers[-1]
    assert [n for n, _ in task.ema_parameters()] == [f"taesd.{n}" for n, _ in task.taesd.named_parameters()]

    enc_only = make_task(config(dec=False, perceptual=0.1))  # no decoder: no LPIPS needed, no D
    assert enc_only.disc is None and enc_only.lpips is None and enc_only.adv_factor() == 0.0
    assert {n for n, p in enc_only.named_parameters() if p.requires_grad} == {
        f"taesd.encoder.{n}" for n, _ in enc_only.taesd.encoder.named_parameters()
    }
    assert [n for n, _ in enc_only.ema_parameters()] == [
        f"taesd.{n}" for n, _ in enc_only.taesd.named_parameters() if n.startswith("encoder.")
    ]
    dec_only = make_task(config(enc=False, disc={"conditional": False}))
    assert dec_only.disc.main[0].in_channels == 3
    assert all(not p.requires_grad for p in dec_only.taesd.encoder.parameters())
    assert make_task(config(disc={"enabled": False})).disc is None
    lpips = LPIPS(random_backbone=True)
    assert make_task(config(perceptual=0.2), lpips=lpips).lpips is lpips
    assert make_task(config(dec=False), lpips=lpips).lpips is None
    with pytest.raises(ValueError) as error:
        make_task(config(perceptual=0.2))
    assert str(error.value) == (
        "loss.perceptual.weight=0.2 needs an LPIPS model; set loss.perceptual.weights=/path/to/vgg16.pth or "
        "loss.perceptual.weight=0"
    )
    # the default optimizer: Adam, 3e-4, betas (0.9, 0.9)
    opt = task.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.Adam)
    assert (opt.defaults["lr"], opt.defaults["betas"]) == (3e-4, (0.9, 0.9))


def test_latents_noise_and_the_teachers_image_rebuilt_by_hand():
    task = make_task(config(max_steps=50))
    task.step = 5
    assert task.draw_seed() == 3 * 1_000_003 + 5 * 131
    mean, logvar = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3 * 1_000_003 + 5 * 131))
    want = (mean + (0.5 * logvar).exp() * noise - SHIFT) * SCALING
    assert torch.allclose(task.sample_latents(mean, logvar), want, atol=1e-6)
    assert torch.equal(make_task(config(sample=False)).sample_latents(mean, logvar), (mean - SHIFT) * SCALING)
    z = torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        image = task.vae.decode(z / SCALING + SHIFT).sample.clamp(-1, 1)
    assert torch.allclose(task.teacher_decode(z), image, atol=1e-6)
    assert float(task.teacher_decode(z * 50).abs().max()) <= 1.0


def test_the_latent_window_is_the_same_cells_in_every_tensor_and_covers_every_position():
    task = make_task(config(taesd={"latent_crop": 2}))
    h, w = 4, 5
    cells = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    image = cells.repeat_interleave(8, -2).repeat_interleave(8, -1)  # each pixel holds its latent cell's number
    tops, lefts = set(), set()
    for step in range(120):
        task.step = step
        (px, none), (lat,) = task.crop_window([image, None], [cells])
        assert none is None and lat.shape[-2:] == (2, 2) and px.shape[-2:] == (16, 16)
        assert torch.equal(px, lat.repeat_interleave(8, -2).repeat_interleave(8, -1))
        top, left = divmod(int(lat[0, 0, 0, 0]), w)
        tops.add(top)
        lefts.add(left)
        assert task.crop_window([image], [cells])[1][0].equal(lat)  # the same step: the same window
    assert tops == {0, 1, 2} and lefts == {0, 1, 2, 3}
    small = torch.zeros(1, 1, 2, 2)
    assert task.crop_window([None, small], [small])[1][0] is small  # a crop as large as the latents: untouched
    wide = torch.arange(8.0).view(1, 1, 2, 4)
    (wide_px,), (wide_lat,) = task.crop_window([torch.zeros(1, 3, 16, 32)], [wide])
    assert wide_lat.shape[-2:] == (2, 2) and wide_px.shape[-2:] == (16, 16)  # as high, wider: still cropped
    assert make_task(config()).crop_window([image], [cells])[1][0] is cells  # no crop set


def test_the_conditional_discriminator_input_is_the_image_and_the_upsampled_latents_over_three():
    task = make_task(config())
    image, z = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 2, 2)
    got = task.disc_input(image, z)
    assert torch.equal(got[:, :3], image)
    assert torch.allclose(got[:, 3:], z.repeat_interleave(8, -2).repeat_interleave(8, -1) / 3.0)
    assert make_task(config(disc={"conditional": False})).disc_input(image, z) is image


# ---------------------------------------------------------------------------------------------------- the losses


def autograd_reference(task: TAESDTask, target, z, factor: float, adaptive: bool, weight: float, cap: float):
    """The decoder's loss, its gradient at x_hat and LDM's adaptive weight, by autograd through the decoder."""
    conv = task.last_layer
    x_hat = task.taesd.decode(z).sample
    nll = F.mse_loss(x_hat, target) * 2.0
    lp = None
    if task.lpips is not None:
        lp = task.lpips(target, x_hat).mean()  # (detached in the returned figures)
        nll = nll + 0.3 * lp
    g = -task.disc(task.disc_input(x_hat, z)).mean()
    if adaptive:
        n_rec = torch.autograd.grad(nll, conv.weight, retain_graph=True)[0].norm()
        n_gan = torch.autograd.grad(g, conv.weight, retain_graph=True)[0].norm()
        d_weight = (n_rec / (n_gan + 1e-4)).clamp(0, cap) * weight
    else:
        d_weight = torch.tensor(weight)
    total = nll + factor * d_weight.detach() * g
    grad = torch.autograd.grad(total, x_hat)[0]
    lp = None if lp is None else lp.detach()
    return grad, {"nll": nll.detach(), "lpips": lp, "g": g.detach(), "d_weight": d_weight, "total": total.detach()}


@pytest.mark.parametrize(
    ("adaptive", "cap", "step", "factor"),
    [(True, 1e4, 0, 0.5), (True, 1e-3, 3, 1.0), (False, 1e4, 2, 1.0), (True, 1e4, 0, 0.0)],
    ids=["adaptive-ramp", "adaptive-capped", "fixed", "before-warmup"],
)
def test_decoder_gradient_and_adaptive_weight_equal_autograd_through_the_decoder(adaptive, cap, step, factor):
    cfg = config(perceptual=0.3, rec_weight=2.0, disc={"warmup_steps": 0, "ramp_steps": 2, "start": 0,
                 "adaptive": adaptive, "max_adaptive_weight": cap, "weight": 0.7})  # fmt: skip
    if factor == 0:
        cfg = config(perceptual=0.3, rec_weight=2.0, disc={"warmup_steps": 1, "weight": 0.7})
    task = make_task(cfg, lpips=LPIPS(random_backbone=True))
    task.step = step
    assert task.adv_factor() == factor == adversarial_factor(step, 0, cfg.disc.warmup_steps, cfg.disc.ramp_steps)
    z = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    target = pixels(2).clamp(-1, 1)
    x_hat = task.student_decode(z)
    grad, logs = task.decoder_output_grad(target, x_hat, z)
    ref_grad, ref = autograd_reference(task, target, z, factor, adaptive, 0.7, cap)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-9)
    assert logs["rec"] == pytest.approx(float(F.mse_loss(x_hat.detach(), target)), rel=1e-5)
    assert logs["lpips"] == pytest.approx(float(ref["lpips"]), rel=1e-5)
    assert float(logs["adv_factor"]) == factor
    if factor == 0:
        assert "g_loss" not in logs and logs["decoder_total"] == pytest.approx(float(ref["nll"]), rel=1e-5)
        return
    assert float(logs["d_weight"]) == pytest.approx(float(ref["d_weight"]), rel=1e-4)
    assert logs["g_loss"] == pytest.approx(float(ref["g"]), rel=1e-5)
    assert logs["decoder_total"] == pytest.approx(float(ref["total"]), rel=1e-5)
    if cap < 1:
        assert float(logs["d_weight"]) == pytest.approx(cap * 0.7)
    assert all(p.grad is None for p in task.disc.parameters()) and all(p.requires_grad for p in task.disc.parameters())


def test_the_last_layer_gradient_equals_autograd_on_its_weight():
    task = make_task(config())
    z = torch.randn(1, 4, 2, 2)
    out = task.student_decode(z)
    seed_grad = torch.randn_like(out)
    want = torch.autograd.grad((out * seed_grad).sum(), task.last_layer.weight)[0]
    assert torch.allclose(task._last_layer_grad(seed_grad), want, rtol=1e-4, atol=1e-7)
    assert not task.last_layer._forward_hooks  # the hook that kept the input is gone


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_d_loss_and_accuracy_written_out_and_nothing_reaches_the_student(kind):
    task = make_task(config(disc={"loss": kind}))
    z = torch.randn(2, 4, 2, 2)
    target = pixels(2)
    x_hat = task.taesd.decode(z).sample
    loss, logs = task.disc_loss(target, x_hat, z)
    real = task.disc(task.disc_input(target, z)).detach()
    fake = task.disc(task.disc_input(x_hat.detach(), z)).detach()
    if kind == "hinge":
        want = 0.5 * ((1 - real).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean())
    else:
        want = 0.5 * (torch.log1p((-real).exp()).mean() + torch.log1p(fake.exp()).mean())
    acc = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5) == float(logs["d_loss"])
    assert float(logs["d_acc"]) == pytest.approx(float(acc))
    loss.backward()
    assert all(p.grad is None for p in task.taesd.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.disc.parameters())


# ---------------------------------------------------------------------------------------------------- training


class StandInTrainer:
    """What training_step reads of a Trainer; the optimizers and schedule are the task's own."""

    def __init__(self, task: TAESDTask) -> None:
        self.should_stop = False
        self.global_rank = 0
        opts, schedules = task.configure_optimizers()
        self.opts, self.schedule = opts, schedules[0]
        self.logged: dict[str, float] = {}
        task._trainer = self
        task.optimizers = lambda: self.opts if len(self.opts) > 1 else self.opts[0]
        task.lr_schedulers = lambda: self.schedule
        task.manual_backward = lambda loss: loss.backward()
        task.log_dict = lambda d, **_: self.logged.update({k: float(v) for k, v in d.items()})
        task.log = lambda k, v, **_: self.logged.__setitem__(k, float(v))


def batch(n: int = 2) -> dict:
    return {"pixels": pixels(n, seed=5)}


def test_one_training_step_updates_both_halves_and_d_and_counts_the_step():
    task = make_task(config(perceptual=0.0, max_steps=2, optimizer=TAESDOptimizerConfig(disc_lr=0.5)))
    trainer = StandInTrainer(task)
    assert [g["lr"] for o in trainer.opts for g in o.param_groups] == [3e-4, 0.5]
    assert {id(p) for p in trainer.opts[0].param_groups[0]["params"]} == {id(p) for p in task.taesd.parameters()}
    assert {id(p) for p in trainer.opts[1].param_groups[0]["params"]} == {id(p) for p in task.disc.parameters()}
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    teacher = weights_checksum(task.vae)
    task.training_step(batch(), 0)
    changed = {n.split(".")[0] + "." + n.split(".")[1] for n, p in task.named_parameters() if not p.equal(before[n])}
    assert changed == {"taesd.encoder", "taesd.decoder", "disc.main"}
    assert weights_checksum(task.vae) == teacher
    assert (task.step, task.bad_in_a_row, task.ema_should_update, trainer.should_stop) == (1, 0, True, False)
    assert trainer.logged["train/step"] == 1.0 and trainer.logged["train/lr"] == pytest.approx(3e-4)
    assert trainer.logged["train/loss"] == trainer.logged["train/total"]
    assert trainer.logged["train/total"] == pytest.approx(
        trainer.logged["train/encoder_mse"] + trainer.logged["train/decoder_total"], rel=1e-6
    )
    assert {"train/d_loss", "train/d_acc", "train/g_loss", "train/d_weight", "train/rec"} <= set(trainer.logged)
    task.training_step(batch(), 1)
    assert task.step == 2 and trainer.should_stop  # the last step stops the run
    trainer.should_stop = False
    task.training_step(batch(), 2)
    assert task.step == 2 and trainer.should_stop and not task.ema_should_update  # past max_steps: nothing runs


def test_the_encoder_loss_is_the_latent_mse_in_the_unet_scale_times_its_weight():
    task = make_task(config(dec=False, taesd={"encoder_weight": 2.5}, sample=False))
    x = pixels(2)
    with torch.no_grad():
        mean = task.vae.encode(x).latent_dist.mean
    surrogate, logs, pair = task.generator_losses(x, mean, (mean - SHIFT) * SCALING)
    want = F.mse_loss(task.taesd.encode(x).latents, (mean - SHIFT) * SCALING).detach()
    assert pair is None and float(logs["encoder_mse"]) == pytest.approx(float(want), rel=1e-6)
    assert float(surrogate.detach()) == pytest.approx(2.5 * float(want), rel=1e-6) == float(logs["total"])


def test_d_waits_for_its_start_and_the_schedule_steps_per_update():
    sched = TAESDOptimizerConfig(lr_scheduler="linear", lr_warmup_steps=2)
    task = make_task(config(max_steps=4, disc={"start": 1}, optimizer=sched))
    trainer = StandInTrainer(task)
    d_before = [p.detach().clone() for p in task.disc.parameters()]
    task.training_step(batch(), 0)
    assert all(p.equal(b) for p, b in zip(task.disc.parameters(), d_before, strict=True))  # step 0 < start 1
    assert "train/d_loss" not in trainer.logged and trainer.logged["train/lr"] == 0.0  # warmup's first rate
    task.training_step(batch(), 1)
    assert "train/d_loss" in trainer.logged and trainer.logged["train/lr"] == pytest.approx(3e-4 / 2)
    assert not all(p.equal(b) for p, b in zip(task.disc.parameters(), d_before, strict=True))


def test_non_finite_losses_skip_the_update_and_stop_after_max_bad_steps(caplog):
    task = make_task(config(max_bad_steps=2))
    trainer = StandInTrainer(task)
    task.vae.decoder.conv_out.bias.data.fill_(float("nan"))  # the teacher's image is NaN: every loss is
    before = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    with caplog.at_level(logging.WARNING):
        task.training_step(batch(), 0)
        assert (task.skipped_steps, task.bad_in_a_row, task.diverged, trainer.should_stop) == (1, 1, None, False)
        task.training_step(batch(), 1)
    assert all(p.equal(before[n]) for n, p in task.named_parameters() if p.requires_grad)
    assert task.step == 0 and task.skipped_steps == 2 and trainer.should_stop and not task.ema_should_update
    assert task.diverged == "2 consecutive steps with a NaN/inf loss (max_bad_steps=2) at step 0"
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "hyperlit.tasks.taesd.module"]
    assert records == [
        (logging.WARNING, "step 0: the generator loss is nan; update skipped (1 in a row)"),
        (logging.WARNING, "step 0: the generator loss is nan; update skipped (2 in a row)"),
        (logging.ERROR, f"training stopped: {task.diverged}"),
    ]


# ---------------------------------------------------------------------------------------------------- validation


def test_validation_metrics_equal_their_definitions():
    task = make_task(config())
    with torch.no_grad():
        task.taesd.decoder.layers[-1].weight.mul_(60)  # images far outside [-1, 1]: the metrics see them clamped
    logged: dict = {}
    sizes: set = set()
    task.log = lambda k, v, batch_size=None, **_: logged.__setitem__(k, v) or sizes.add(batch_size)
    x = pixels(5, seed=9) * 1.5  # inputs past [-1, 1] too: PSNR against the input is against its clamped image
    task.validation_step({"pixels": x}, 0)
    with torch.no_grad():
        z = (task.vae.encode(x).latent_dist.mean - SHIFT) * SCALING
        target = task.vae.decode(z / SCALING + SHIFT).sample.clamp(-1, 1)
        out = task.taesd.decode(z).sample.clamp(-1, 1)
        enc = F.mse_loss(task.taesd.encode(x).latents, z)
    assert float(task.taesd.decode(z).sample.detach().abs().max()) > 2  # the clamp matters
    assert sizes == {5}  # every figure weighted by the batch's images
    a, b = (target + 1) / 2, (out + 1) / 2
    assert float(task.val_psnr.compute()) == pytest.approx(float(10 * torch.log10(1 / ((a - b) ** 2).mean())), rel=1e-5)
    psnr_in = 10 * torch.log10(1 / ((b - (x.clamp(-1, 1) + 1) / 2) ** 2).mean())
    assert float(task.val_psnr_input.compute()) == pytest.approx(float(psnr_in), rel=1e-5)
    assert float(task.val_decoder_mse.compute()) == pytest.approx(float(F.mse_loss(out, target)), rel=1e-5)
    assert float(task.val_encoder_mse.compute()) == pytest.approx(float(enc), rel=1e-5)
    assert float(logged["val/loss"].detach()) == pytest.approx(float(enc + F.mse_loss(out, target)), rel=1e-5)
    assert {"val/psnr", "val/ssim", "val/psnr_input", "val/decoder_mse", "val/encoder_mse"} <= set(logged)
    assert "val/lpips_vgg" not in logged
    assert torch.allclose(task._panel[0], target[:4]) and torch.allclose(task._panel[1], out[:4], atol=1e-6)
    task._panel = None
    task.validation_step({"pixels": x}, 1)
    assert task._panel is None  # the panel is the first batch's
    enc_only = make_task(config(dec=False))
    enc_only.log = lambda k, v, **_: logged.__setitem__(k, v)
    enc_only.validation_step({"pixels": x}, 0)
    assert enc_only._panel is None and enc_only.val_psnr.update_count == 0


def test_validation_lpips_is_the_perceptual_net_on_the_teachers_and_the_students_images_unless_it_is_random():
    lpips = LPIPS(random_backbone=True)
    for is_random in (False, True):
        torch.manual_seed(11)
        task = TAESDTask(make_vae(), config(perceptual=0.1), lpips, is_random, None, seed=3)
        logged: dict = {}
        task.log = lambda k, v, _logged=logged, batch_size=None, **_: _logged.__setitem__(k, (v, batch_size))
        x = pixels(3, seed=4)
        task.validation_step({"pixels": x}, 0)
        assert ("val/lpips_vgg" in logged) is not is_random  # a random backbone's figure means nothing
        assert {size for _, size in logged.values()} == {3}
        assert is_random or logged["val/lpips_vgg"][0] is task.val_lpips
    with torch.no_grad():
        z = (task.vae.encode(x).latent_dist.mean - SHIFT) * SCALING
        target = task.vae.decode(z / SCALING + SHIFT).sample.clamp(-1, 1)
        out = task.taesd.decode(z).sample.clamp(-1, 1)
        want = float(lpips(target, out).mean())
        task.perceptual_is_random = False
        task.val_lpips.reset()
        task.validation_step({"pixels": x}, 0)
    assert float(task.val_lpips.compute()) == pytest.approx(want, rel=1e-5)
    assert float(lpips(out, out).mean()) == 0 != want  # the figure compares two different images


def test_the_panel_of_the_first_batch_is_logged_once_by_rank_zero_outside_the_sanity_check(monkeypatch):
    calls: list = []
    monkeypatch.setattr(taesd_module, "log_image_panel", lambda *a: calls.append(a))
    task = make_task(config())
    target, out = pixels(2, seed=1), pixels(2, seed=2)
    for sanity, zero, logged in ((False, True, 1), (True, True, 1), (False, False, 1)):  # calls so far
        task._trainer = SimpleNamespace(sanity_checking=sanity, is_global_zero=zero, loggers=["L"])
        task._panel, task.step = (target, out), 12
        task.on_validation_epoch_end()
        assert task._panel is None and len(calls) == logged
    loggers, key, image, step = calls[0]
    assert (loggers, key, step) == (["L"], "val/teacher_vs_tiny", 12)
    assert image.shape == (3, 2 * 16, 3 * 16)
    assert torch.allclose(image[:, :16, :16], (target[0] + 1) / 2) and torch.allclose(
        image[:, :16, 16:32], (out[0] + 1) / 2
    )
    task._trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, loggers=["L"])
    task.on_validation_epoch_end()  # no panel (an encoder-only run): nothing logged
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_hold_the_trainable_state_and_refuse_another_teacher_or_a_lost_schedule():
    task = make_task(config())
    task.step, task.skipped_steps = 7, 2
    checkpoint = {"state_dict": dict(task.state_dict()), "lr_schedulers": [{}]}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith(("taesd.", "disc.")) for k in checkpoint["state_dict"])
    assert {k for k in task.state_dict() if k.startswith(("taesd.", "disc."))} == set(checkpoint["state_dict"])
    assert checkpoint["taesd_task"] == {
        "step": 7, "skipped_steps": 2, "teacher_checksum": task.teacher_checksum, "latent_channels": 4,
    }  # fmt: skip
    fresh = make_task(config())
    fresh.on_load_checkpoint(checkpoint)
    assert (fresh.step, fresh.skipped_steps) == (7, 2)
    old = {"taesd_task": {"teacher_checksum": task.teacher_checksum}}
    fresh.on_load_checkpoint(old)  # older checkpoints: counters from 0; no schedule needed for a constant rate
    assert (fresh.step, fresh.skipped_steps) == (0, 0)

    def refusal(t: TAESDTask, ckpt: dict) -> str:
        with pytest.raises(ValueError) as error:
            t.on_load_checkpoint(ckpt)
        return str(error.value)

    assert refusal(fresh, {}) == "ckpt_path: not a checkpoint of the TAESD task (--config-name taesd)"
    other = make_task(config(), make_vae(seed=1))
    assert refusal(other, checkpoint) == (
        f"ckpt_path: the checkpoint distils a different VAE (checksum {task.teacher_checksum[:12]} vs "
        f"{other.teacher_checksum[:12]}); use the same model.path"
    )
    for sched, warmup in (("cosine", 0), ("constant", 1)):
        scheduled = make_task(config(optimizer=TAESDOptimizerConfig(lr_scheduler=sched, lr_warmup_steps=warmup)))
        assert refusal(scheduled, old) == (
            "ckpt_path: the checkpoint holds no learning-rate schedule state (written before train.lr_scheduler "
            f"existed), so train.lr_scheduler={sched} / train.lr_warmup_steps={warmup} cannot resume where it "
            "stopped; resume with lr_scheduler=constant and lr_warmup_steps=0"
        )
        scheduled.on_load_checkpoint(checkpoint)  # with its schedule's state: resumes


def test_scenes_are_drawn_in_the_asked_look_size_and_share_of_checkered_backgrounds(monkeypatch):
    """``draw`` replaced by a recorder: each scene's call, for the sample set's look and the base's."""
    calls: list = []

    def record(scene, size=None, **kw):
        calls.append((size, kw))
        return Image.new("RGB", size)

    monkeypatch.setattr(scenes, "draw", record)
    out = scenes.draw_scene(random.Random(0), 24, 40, 1.0)
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8
    assert calls == [((40, 24), {"checker": True, "dark": SAMPLE_CHECKER_DARK})]
    calls.clear()
    rng = random.Random(1)
    for _ in range(400):
        scenes.draw_scene(rng, 8, 16, 0.0)
    assert {size for size, _ in calls} == {(16, 8)}
    assert {(kw["jitter"], kw["rng"] is rng) for _, kw in calls} == {(25, True)}
    share = sum(kw["checker"] for _, kw in calls) / len(calls)
    assert 0.28 < share < 0.42  # 0.35 of the base's backgrounds are checkered (400 draws: sd 0.024)


def test_build_hands_the_teacher_the_perceptual_net_the_options_and_the_seed_to_the_task(caplog):
    """The embedded tiny base: LPIPS on a random backbone (``random_backbone: auto``); an encoder-only run none."""
    sample = str(REPO_ROOT / "datasets" / "sample")
    lpips = ["loss.perceptual.weight=0.1", "loss.perceptual.random_backbone=auto", "loss.perceptual.weights=null"]
    cfg = compose_config("taesd", [f"data.path={sample}", "seed=5", "train.max_steps=30", *lpips])
    with caplog.at_level(logging.INFO):
        module = build(cfg).load_module()
    assert isinstance(module, TAESDTask) and module.seed == 5 and module.config == task_config(cfg)
    assert module.teacher_checksum == weights_checksum(embedded_tiny_vae().float())
    assert isinstance(module.lpips, LPIPS) and module.perceptual_is_random
    assert any(r.getMessage().startswith("TAESD task: distilling the encoder and decoder of ") for r in caplog.records)
    encoder_only = build(compose_config("taesd", [f"data.path={sample}", "taesd.train_decoder=false", *lpips]))
    encoder_only = encoder_only.load_module()
    assert encoder_only.lpips is None and not encoder_only.perceptual_is_random and encoder_only.disc is None


def test_builds_report_and_ddp_trainer_arguments(caplog):
    sample = str(REPO_ROOT / "datasets" / "sample")
    gpu = build(compose_config("taesd", [f"data.path={sample}", "trainer=ddp", "disc.norm=batch"]))
    assert gpu.trainer_kwargs == {"strategy": "ddp_find_unused_parameters_true", "sync_batchnorm": True}
    group = build(compose_config("taesd", [f"data.path={sample}", "trainer=ddp", "disc.norm=group"]))
    assert group.trainer_kwargs == {"strategy": "ddp_find_unused_parameters_true"}  # the disc's own norm decides
    with caplog.at_level(logging.INFO, logger="hyperlit.tasks.taesd.build"):
        plain = build(compose_config("taesd", [f"data.path={sample}"]))
        assert plain.trainer_kwargs == {}
        assert plain.report(SimpleNamespace(skipped_steps=0, diverged=None)) is None
        assert plain.report(SimpleNamespace(skipped_steps=3, diverged="it broke")) == "it broke"
        build(compose_config("taesd", [f"data.path={sample}", "trainer=ddp_cpu"]))
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "hyperlit.tasks.taesd.build"] == [
        (logging.WARNING, "3 training steps were skipped for NaN/inf losses"),
        (logging.ERROR, "TAESD training stopped early: it broke"),
        (logging.INFO, "TAESD task under DDP: trainer overrides {'strategy': 'ddp_find_unused_parameters_true'}"),
    ]
