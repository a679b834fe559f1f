"""The VAE task's training, validation and checkpoint hooks with a stand-in trainer (issue 31): each update against
the same step written out by hand (the losses as formulas, torch optimizers built here), the validation metrics
against formulas and torchmetrics' functional forms on a copy of the starting decoder, the divergence message,
the checkpoint contents and the parts and flags set at construction."""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from helpers.models import TINY_VAE
from torchmetrics.functional.image import structural_similarity_index_measure

from hyperlit.tasks.vae.module import VAEDecoderTask, frozen_checksum
from hyperlit.vae.colour import ColourAccumulator, ColourCheck, ColourStats, compare_colours
from hyperlit.vae.config import (
    DiscConfig,
    Fp16FixConfig,
    LossConfig,
    OptimizerConfig,
    PerceptualConfig,
    PosteriorConfig,
    VAETaskConfig,
)
from hyperlit.vae.discriminator import PatchDiscriminator

TINY = TINY_VAE  # tests/helpers/models.py: the one tiny VAE layout the tests share
LOGGER = "hyperlit.tasks.vae.module"
vae_module = importlib.import_module(LOGGER)  # `hyperlit.tasks.vae` names its build() entry `vae`


def tiny_vae(seed: int = 0, **extra) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY, **extra)


def pixels(n: int = 2, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class AbsLPIPS(torch.nn.Module):
    """A stand-in perceptual distance: the per-image mean |a - b| (cheap, and exactly known)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().flatten(1).mean(1).view(-1, 1, 1, 1)


def make_task(
    disc: DiscConfig | None = None, perceptual=None, is_random=False, optimizer=None, **cfg
) -> VAEDecoderTask:
    config = VAETaskConfig(
        max_steps=cfg.pop("max_steps", 3),
        loss=cfg.pop("loss", LossConfig("l1", 2.0, PerceptualConfig(weight=0.0))),
        disc=disc or DiscConfig(ndf=8, n_layers=2, norm="none", adaptive=False, weight=0.5),
        posterior=PosteriorConfig(cache=False, sample=False),
        **cfg,
    )
    torch.manual_seed(100)
    return VAEDecoderTask(tiny_vae(), config, perceptual, perceptual_is_random=is_random, optimizer=optimizer)


class StandIn:
    """What the task reads of a Trainer: stop flag, rank, sanity check, loggers, checkpoint callbacks; logs kept
    with their keyword arguments."""

    def __init__(self, task: VAEDecoderTask, checkpoints=(), zero: bool = True, sanity: bool = False) -> None:
        self.should_stop = False
        self.is_global_zero = zero
        self.sanity_checking = sanity
        self.loggers = ["L"]
        self.checkpoint_callbacks = list(checkpoints)
        self.logged: dict[str, object] = {}
        self.kwargs: dict[str, dict] = {}
        self.clipped: list[tuple] = []
        self.opts = task.configure_optimizers()
        task._trainer = self
        task.optimizers = lambda: self.opts if len(self.opts) > 1 else self.opts[0]
        task.manual_backward = lambda loss: loss.backward()
        task.log = self.log
        task.log_dict = lambda d, **kw: [self.log(k, v, **kw) for k, v in d.items()]

        def clip(opt, gradient_clip_val, gradient_clip_algorithm):
            self.clipped.append((opt, gradient_clip_val, gradient_clip_algorithm))
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

        task.clip_gradients = clip

    def log(self, key, value, **kwargs) -> None:
        self.logged[key] = value
        self.kwargs[key] = kwargs


def value(v) -> float:
    return float(v.compute()) if hasattr(v, "compute") else float(v)


# ------------------------------------------------------------------------------------------------ construction


def test_parts_flags_and_defaults_set_at_construction():
    task = make_task(disc=DiscConfig(ndf=8, n_layers=2, norm="batch"))
    for name, p in task.vae.named_parameters():
        assert p.requires_grad == name.startswith(("decoder.", "post_quant_conv.")), name
    assert task.trainable_modules() == [task.vae.post_quant_conv, task.vae.decoder]
    assert [n for n, _ in task.ema_parameters()] == [
        n for n, _ in task.named_parameters() if n.startswith(("vae.decoder.", "vae.post_quant_conv."))
    ]
    assert all(not p.requires_grad for p in task.start_decoder.parameters())
    assert set(task.start_decoder) == {"decoder", "post_quant_conv"}
    for name, p in task.start_decoder["decoder"].state_dict().items():
        assert torch.equal(p, task.vae.decoder.state_dict()[name]) and p is not task.vae.decoder.state_dict()[name]
    want = PatchDiscriminator(3, 8, 2, "batch")
    assert [type(m) for m in task.disc.modules()] == [type(m) for m in want.modules()]
    assert {k: v.shape for k, v in task.disc.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}
    assert task.frozen_checksum == frozen_checksum(task.vae) and task.vae.dtype == torch.float32
    assert (task.step, task.skipped_steps, task.bad_in_a_row, task.diverged, task.gains) == (0, 0, 0, None, None)
    assert (task.fp16_fix, task.fp16_rescaled, task.fp16_scope, task.ema_should_update) == (False, False, None, False)
    assert not task.automatic_optimization and not task.strict_loading
    assert task.val_psnr.data_range == 1.0 and task.start_psnr.data_range == 1.0
    assert task.val_ssim.data_range == 1.0 and task.start_ssim.data_range == 1.0
    g, d = task.configure_optimizers()
    for opt in (g, d):  # train.optimizer's default: AdamW lr 1e-5, betas (0.5, 0.9), no weight decay
        assert type(opt) is torch.optim.AdamW
        assert [(x["lr"], x["betas"], x["weight_decay"]) for x in opt.param_groups] == [(1e-5, (0.5, 0.9), 0.0)]
    assert [id(p) for p in g.param_groups[0]["params"]] == [
        id(p) for m in task.trainable_modules() for p in m.parameters()
    ]
    assert [id(p) for p in d.param_groups[0]["params"]] == [id(p) for p in task.disc.parameters()]


def test_no_post_quant_conv_no_disc_and_a_separate_disc_lr():
    config = VAETaskConfig(
        loss=LossConfig(perceptual=PerceptualConfig(weight=0.0)),
        disc=DiscConfig(enabled=False),
        posterior=PosteriorConfig(cache=False, sample=False),
    )
    task = VAEDecoderTask(tiny_vae(use_post_quant_conv=False), config, None)
    assert task.vae.post_quant_conv is None and task.trainable_modules() == [task.vae.decoder]
    assert set(task.start_decoder) == {"decoder"} and task.disc is None and task.adv_factor() == 0.0
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(task.start_decode(z), task.vae.decode(z).sample)
    opt = task.configure_optimizers()
    assert len(opt) == 1 and [id(p) for p in opt[0].param_groups[0]["params"]] == [
        id(p) for p in task.vae.decoder.parameters()
    ]
    sgd = functools.partial(torch.optim.SGD, lr=0.2)
    config = VAETaskConfig(
        loss=LossConfig(perceptual=PerceptualConfig(weight=0.0)),
        disc=DiscConfig(ndf=8, n_layers=2),
        optimizer=OptimizerConfig(disc_lr=0.07),
    )
    g, d = VAEDecoderTask(tiny_vae(), config, None, optimizer=sgd).configure_optimizers()
    assert (g.param_groups[0]["lr"], d.param_groups[0]["lr"]) == (0.2, 0.07)
    fix = VAEDecoderTask(
        tiny_vae(), VAETaskConfig(loss=LossConfig(perceptual=PerceptualConfig(weight=0.0), kind="fp16_fix")), None
    )
    assert fix.disc is None and fix.gains is not None and fix.fp16_fix
    assert all(not p.requires_grad for p in fix.vae.parameters())  # only the gains train by default
    both = VAEDecoderTask(
        tiny_vae(),
        VAETaskConfig(
            loss=LossConfig(
                perceptual=PerceptualConfig(weight=0.0), kind="fp16_fix", fp16_fix=Fp16FixConfig(train_weights=True)
            )
        ),
        None,
    )
    for name, p in both.vae.named_parameters():
        assert p.requires_grad == name.startswith(("decoder.", "post_quant_conv.")), name


def test_decode_keeps_conv_out_input_and_leaves_no_hook():
    task = make_task()
    z = torch.randn(2, 4, 4, 4)
    seen = []
    h = task.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    out = task.decode(z)
    h.remove()
    assert torch.equal(task._conv_out_input, seen[0]) and out.shape == (2, 3, 8, 8)
    assert not task.vae.decoder.conv_out._forward_hooks


# ------------------------------------------------------------------------------------------------ training


def hand_step(task: VAEDecoderTask, x: torch.Tensor, factor: float, train_d: bool, g_lr: float, d_lr: float):
    """One generator + discriminator step written out: 2·L1 + factor·0.5·(-mean D(x̂)) for the decoder (fixed D
    weight 0.5), hinge ½(mean relu(1 - D(x)) + mean relu(1 + D(x̂))) for D on the same x̂; SGD steps."""
    ref = SimpleNamespace(vae=copy.deepcopy(task.vae), disc=copy.deepcopy(task.disc))
    with torch.no_grad():
        z = ref.vae.encode(x).latent_dist.mean
    x_hat = ref.vae.decode(z).sample
    g_params = [p for m in (ref.vae.post_quant_conv, ref.vae.decoder) for p in m.parameters()]
    rec = (x_hat - x).abs().mean()
    loss = 2.0 * rec
    if factor > 0:
        for p in ref.disc.parameters():
            p.requires_grad_(False)
        loss = loss + factor * 0.5 * (-ref.disc(x_hat).mean())
        for p in ref.disc.parameters():
            p.requires_grad_(True)
    g_grads = torch.autograd.grad(loss, g_params)
    d_grads = None
    if train_d:
        d_loss = 0.5 * (F.relu(1 - ref.disc(x)).mean() + F.relu(1 + ref.disc(x_hat.detach())).mean())
        d_grads = torch.autograd.grad(d_loss, list(ref.disc.parameters()))
    with torch.no_grad():
        for p, g in zip(g_params, g_grads, strict=True):
            p -= g_lr * g
        if d_grads is not None:
            for p, g in zip(ref.disc.parameters(), d_grads, strict=True):
                p -= d_lr * g
    return ref, float(loss), float(rec), g_grads, d_grads


@pytest.mark.parametrize(("start", "warmup"), [(0, 0), (0, 1), (1, 0)], ids=["gan-at-once", "d-warm-up", "d-later"])
def test_training_steps_match_the_steps_written_out(start, warmup):
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    disc = DiscConfig(start=start, warmup_steps=warmup, ndf=8, n_layers=2, norm="none", adaptive=False, weight=0.5)
    config = VAETaskConfig(
        max_steps=2,
        loss=LossConfig("l1", 2.0, PerceptualConfig(weight=0.0)),
        disc=disc,
        optimizer=OptimizerConfig(disc_lr=0.3),
        posterior=PosteriorConfig(cache=False, sample=False),
    )
    torch.manual_seed(100)
    task = VAEDecoderTask(tiny_vae(), config, None, optimizer=sgd)
    trainer = StandIn(task)
    task.bad_in_a_row = 4
    for i in range(2):
        x = pixels(2, seed=i)
        factor = 1.0 if i >= start + warmup else 0.0
        train_d = i >= start
        ref, loss, rec, g_grads, d_grads = hand_step(task, x, factor, train_d, 0.05, 0.3)
        d_before = [p.detach().clone() for p in task.disc.parameters()]
        task.training_step({"pixels": x}, i)
        g_params = [p for m in task.trainable_modules() for p in m.parameters()]
        for p, g in zip(g_params, g_grads, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-8)
        for part in ("vae", "disc"):
            want = getattr(ref, part).state_dict()
            for k, v in getattr(task, part).state_dict().items():
                torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-7, msg=k)
        assert any(not torch.equal(a, b) for a, b in zip(d_before, task.disc.parameters(), strict=True)) == train_d
        assert (task.step, task.bad_in_a_row, task.ema_should_update) == (i + 1, 0, True)
        assert trainer.should_stop == (i == 1)
        logged = {k: value(v) for k, v in trainer.logged.items()}
        assert logged["train/total"] == pytest.approx(loss, rel=1e-5)
        assert logged["train/rec"] == pytest.approx(rec, rel=1e-5)
        assert logged["train/nll"] == pytest.approx(2 * rec, rel=1e-5)
        assert logged["train/adv_factor"] == factor and logged["train/step"] == i + 1
        assert logged["train/skipped_steps"] == 0.0
        assert ("train/d_loss" in trainer.logged) == train_d and ("train/g_loss" in trainer.logged) == (factor > 0)
        assert all(kw == {"on_step": True, "batch_size": 2} for kw in trainer.kwargs.values())
        trainer.logged.clear()
    trainer.should_stop = False
    before = copy.deepcopy(task.state_dict())
    task.training_step({"pixels": pixels(2)}, 2)  # past max_steps: nothing runs
    assert trainer.should_stop and task.step == 2 and not task.ema_should_update and trainer.logged == {}
    assert all(torch.equal(a, b) for a, b in zip(before.values(), task.state_dict().values(), strict=True))


class TwoLogits(torch.nn.Module):
    """A stand-in discriminator: fixed logits for real images (positive pixels) and for fakes (negative ones),
    zeros among them, so that the accuracy's strict comparisons matter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.real = torch.tensor([1.0, 2.0, -1.0, 0.0])
        self.fake = torch.tensor([-1.0, 0.0, 0.0, 3.0])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.real if float(t.sum()) > 0 else self.fake)


def test_the_discriminator_loss_and_its_logs_are_the_formulas():
    task = make_task()
    task.disc = TwoLogits()
    x, x_hat = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), -0.5, requires_grad=True)
    loss, logs = task.disc_loss(x, x_hat)
    # hinge: ½(mean relu(1 - real) + mean relu(1 + fake)) = ½((0 + 0 + 2 + 1)/4 + (0 + 1 + 1 + 4)/4)
    assert float(loss) == 0.5 * (3 / 4 + 6 / 4) == float(logs["d_loss"])
    assert (float(logs["logits_real"]), float(logs["logits_fake"])) == (0.5, 0.5)
    assert float(logs["d_acc"]) == 0.5 * (2 / 4 + 1 / 4)  # real > 0: 2 of 4; fake < 0: 1 of 4 (zeros count as wrong)
    loss.backward()
    assert x_hat.grad is None and all(not v.requires_grad for v in logs.values())
    assert float(task.disc.scale.grad) != 0.0


def test_gradient_clipping_is_by_global_norm_per_optimizer():
    config = VAETaskConfig(
        max_steps=3,
        loss=LossConfig("l1", 2.0, PerceptualConfig(weight=0.0)),
        disc=DiscConfig(ndf=8, n_layers=2, norm="none", adaptive=False),
        optimizer=OptimizerConfig(grad_clip=1e-3),
        posterior=PosteriorConfig(cache=False, sample=False),
    )
    task = VAEDecoderTask(tiny_vae(), config, None, optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    trainer = StandIn(task)
    before = [p.detach().clone() for p in task.trainable_modules()[1].parameters()]
    task.training_step({"pixels": pixels(2)}, 0)
    assert [(o, c, a) for o, c, a in trainer.clipped] == [
        (trainer.opts[0], 1e-3, "norm"),
        (trainer.opts[1], 1e-3, "norm"),
    ]
    moved = torch.linalg.vector_norm(
        torch.cat(
            [(p.detach() - b).flatten() for p, b in zip(task.trainable_modules()[1].parameters(), before, strict=True)]
        )
    )
    assert float(moved) <= 1e-3 * 1.0001  # SGD lr 1: the step is the clipped gradient


# ------------------------------------------------------------------------------------------------ bad steps


@pytest.mark.parametrize(
    ("checkpoints", "where"),
    [
        ([], "none saved yet"),
        ([SimpleNamespace(last_model_path="", best_model_path="")], "none saved yet"),
        ([SimpleNamespace(last_model_path="", best_model_path="/r/best.ckpt")], "/r/best.ckpt"),
        ([SimpleNamespace(last_model_path="/r/last.ckpt", best_model_path="/r/best.ckpt")], "/r/last.ckpt"),
        ([SimpleNamespace(), SimpleNamespace(best_model_path="/r/b2.ckpt"), SimpleNamespace(last_model_path="/x")],
         "/r/b2.ckpt"),
    ],
    ids=["none", "empty", "best", "last-first", "first-callback-with-a-path"],
)  # fmt: skip
def test_non_finite_steps_are_skipped_then_stop_naming_the_last_good_checkpoint(checkpoints, where, caplog):
    task = make_task(max_bad_steps=3, max_steps=10)
    trainer = StandIn(task, checkpoints)
    before = copy.deepcopy(task.state_dict())
    task.step = 5
    bad = pixels(2)
    bad[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for i in range(3):
            task.training_step({"pixels": bad}, i)
            assert trainer.should_stop == (i == 2) and task.skipped_steps == i + 1 and task.bad_in_a_row == i + 1
    assert task.step == 5 and not task.ema_should_update and trainer.logged == {}
    assert all(torch.equal(a, b) for a, b in zip(before.values(), task.state_dict().values(), strict=True))
    assert task.diverged == (
        f"3 consecutive steps with a NaN/inf loss (max_bad_steps=3) at step 5; last good checkpoint: {where}"
    )
    assert caplog.messages == [
        "step 5: the generator loss is nan; update skipped (1 in a row)",
        "step 5: the generator loss is nan; update skipped (2 in a row)",
        "step 5: the generator loss is nan; update skipped (3 in a row)",
        f"training stopped: {task.diverged}",
    ]
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 3 + ["ERROR"]
    task.training_step({"pixels": pixels(2)}, 3)  # a good step resets the count, not the total
    assert (task.bad_in_a_row, task.skipped_steps, task.step) == (0, 3, 6)
    assert trainer.logged["train/skipped_steps"] == 3.0


def test_a_non_finite_discriminator_loss_skips_both_updates(caplog):
    task = make_task(max_bad_steps=5)
    trainer = StandIn(task)
    before = copy.deepcopy(task.state_dict())
    task.disc_loss = lambda x, x_hat: (torch.tensor(float("inf")), {})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        task.training_step({"pixels": pixels(2)}, 0)
    assert caplog.messages == ["step 0: the discriminator loss is inf; update skipped (1 in a row)"]
    assert (task.step, task.skipped_steps, trainer.should_stop, task.ema_should_update) == (0, 1, False, False)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), task.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------------------ validation


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("is_random", [False, True], ids=["lpips", "random-lpips"])
def test_validation_metrics_are_the_formulas_for_the_trained_and_the_starting_decoder(is_random, monkeypatch):
    task = make_task(perceptual=AbsLPIPS(), is_random=is_random)
    start = copy.deepcopy(task.vae)
    with torch.no_grad():
        for p in task.vae.decoder.parameters():
            p.mul_(1.3)  # "trained": differs from the starting decoder
    trainer = StandIn(task)
    panels = []
    monkeypatch.setattr(vae_module, "log_image_panel", lambda *a: panels.append(a))
    batches = [pixels(5, seed=1), pixels(2, seed=2)]  # 2 images: not the channel count
    for i, x in enumerate(batches):
        task.validation_step({"pixels": x, "index": torch.arange(len(x))}, i)
    assert task._panel is not None and torch.equal(task._panel[0], batches[0][:4])
    x_all = torch.cat(batches)
    with torch.no_grad():
        z = start.encode(x_all).latent_dist.mean
        trained = task.vae.decode(z).sample.clamp(-1, 1)
        first = start.decode(z).sample.clamp(-1, 1)
    assert torch.allclose(task._panel[1], trained[:4], atol=1e-6)
    assert torch.allclose(task._fp16_latents, z[:5], atol=1e-6)
    a, b, s = (x_all + 1) / 2, (trained + 1) / 2, (first + 1) / 2
    got = {k: value(v) for k, v in trainer.logged.items()}
    assert got["val/psnr"] == pytest.approx(psnr(a, b), rel=1e-5)
    assert got["val/start_psnr"] == pytest.approx(psnr(a, s), rel=1e-5)
    ssim = [structural_similarity_index_measure(p, t, data_range=1.0) for p, t in ((b[:5], a[:5]), (b[5:], a[5:]))]
    assert got["val/ssim"] == pytest.approx(float((ssim[0] * 5 + ssim[1] * 2) / 7), rel=1e-4)
    ssim0 = [structural_similarity_index_measure(p, t, data_range=1.0) for p, t in ((s[:5], a[:5]), (s[5:], a[5:]))]
    assert got["val/start_ssim"] == pytest.approx(float((ssim0[0] * 5 + ssim0[1] * 2) / 7), rel=1e-4)
    if is_random:
        assert "val/lpips_vgg" not in got and "val/start_lpips_vgg" not in got
    else:
        assert got["val/lpips_vgg"] == pytest.approx(float((x_all - trained).abs().mean()), rel=1e-5)
        assert got["val/start_lpips_vgg"] == pytest.approx(float((x_all - first).abs().mean()), rel=1e-5)
    assert {k: kw for k, kw in trainer.kwargs.items()} == {k: {"batch_size": 2} for k in trainer.kwargs}

    task.step = 7
    task.on_validation_epoch_end()
    ins, outs = ColourAccumulator(), ColourAccumulator()
    ins.update(a)
    outs.update(b)
    want = compare_colours(ins.result(), outs.result())
    got = task.colour_check  # batch by batch against all at once: the same up to rounding
    assert got.warnings == want.warnings
    assert got.input.mean == pytest.approx(want.input.mean) and got.output.mean == pytest.approx(want.output.mean)
    assert value(trainer.logged["val/saturation_ratio"]) == got.saturation_ratio == pytest.approx(want.saturation_ratio)
    assert value(trainer.logged["val/contrast_ratio"]) == got.contrast_ratio == pytest.approx(want.contrast_ratio)
    shift = max(abs(v) for v in want.mean_shift)
    assert value(trainer.logged["val/colour_shift"]) == pytest.approx(shift) and shift > 0.01
    ((loggers, key, image, step),) = panels
    assert (loggers, key, step) == (["L"], "val/reconstruction", 7) and image.shape == (3, 4 * 16, 3 * 16)
    assert task._panel is None and task._colour_in.pixels == 0 and task._colour_out.pixels == 0


@pytest.mark.parametrize(("sanity", "zero"), [(True, True), (False, False)], ids=["sanity-check", "rank-1"])
def test_no_panel_in_the_sanity_check_or_off_rank_zero(sanity, zero, monkeypatch):
    task = make_task()
    trainer = StandIn(task, sanity=sanity, zero=zero)
    panels = []
    monkeypatch.setattr(vae_module, "log_image_panel", lambda *a: panels.append(a))
    task.validation_step({"pixels": pixels(2)}, 0)
    task.on_validation_epoch_end()
    assert panels == [] and task._panel is None and task.colour_check is not None
    assert "val/saturation_ratio" in trainer.logged
    trainer.logged.clear()
    task.on_validation_epoch_end()  # nothing accumulated: no colour check logged again
    assert trainer.logged == {}


def stats(v: float) -> ColourStats:
    return ColourStats(mean=(v, v, v), std=(0.1, 0.1, 0.1), saturation=v, contrast=v)


def test_the_colour_check_is_reported_at_the_end_by_rank_zero(caplog):
    task = make_task()
    trainer = StandIn(task)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        task.on_train_end()  # no validation ran
    assert caplog.messages == []
    task.colour_check = ColourCheck(stats(0.5), stats(0.5), 1.234, 0.987, (0.0, 0.0, 0.0), [])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        task.on_train_end()
    assert caplog.messages == ["colour check passed: saturation x1.23, contrast x0.99 of the inputs'"]
    caplog.clear()
    task.colour_check = ColourCheck(stats(0.5), stats(0.2), 0.4, 0.4, (0.0, 0.0, 0.0), ["desaturates: x", "loses: y"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        task.on_train_end()
    assert caplog.messages == [
        "colour check of the last validation: the decoder desaturates: x",
        "colour check of the last validation: the decoder loses: y",
    ]
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    caplog.clear()
    trainer.is_global_zero = False
    with caplog.at_level(logging.INFO, logger=LOGGER):
        task.on_train_end()
    assert caplog.messages == []


def test_fp16_check_latents_come_from_validation_then_training_images():
    task = make_task()
    val, train = pixels(2, seed=4), pixels(3, seed=5)
    with torch.no_grad():
        want_val = task.vae.encode(val).latent_dist.mean
        want_train = task.vae.encode(train).latent_dist.mean
    both = SimpleNamespace(datamodule=SimpleNamespace(val_dataloader=lambda: [{"pixels": val}],
                                                      train_dataloader=lambda: [{"pixels": train}]))  # fmt: skip
    assert torch.allclose(task.fp16_check_latents(both), want_val, atol=1e-6)
    no_val = SimpleNamespace(datamodule=SimpleNamespace(val_dataloader=lambda: [],
                                                        train_dataloader=lambda: [{"pixels": train}]))  # fmt: skip
    assert torch.allclose(task.fp16_check_latents(no_val), want_train, atol=1e-6)
    only_train = SimpleNamespace(datamodule=SimpleNamespace(train_dataloader=lambda: [{"pixels": train}]))
    assert torch.allclose(task.fp16_check_latents(only_train), want_train, atol=1e-6)
    assert task.fp16_check_latents(SimpleNamespace(datamodule=None)) is None
    task._fp16_latents = torch.ones(1)
    assert torch.equal(task.fp16_check_latents(both), torch.ones(1))


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_hold_the_trainable_state_and_the_task_state():
    task = make_task(loss=LossConfig(perceptual=PerceptualConfig(weight=0.0)))
    task.step, task.skipped_steps, task.fp16_rescaled, task.fp16_scope = 9, 2, True, ["post_quant_conv"]
    ckpt = {"state_dict": dict(task.state_dict()) | {"lpips.x": torch.ones(1), "gains.a": torch.ones(1)}}
    task.on_save_checkpoint(ckpt)
    want = {
        k
        for k in task.state_dict()
        if k.split(".")[0] == "disc" or k.startswith(("vae.decoder.", "vae.post_quant_conv."))
    }
    assert set(ckpt["state_dict"]) == want | {"gains.a"}
    assert ckpt["vae_task"] == {
        "step": 9, "skipped_steps": 2, "frozen_checksum": task.frozen_checksum,
        "fp16_rescaled": True, "fp16_scope": ["post_quant_conv"],
    }  # fmt: skip
    fresh = make_task()
    fresh.on_load_checkpoint(ckpt)
    assert (fresh.step, fresh.skipped_steps, fresh.fp16_rescaled, fresh.fp16_scope) == (9, 2, True, ["post_quant_conv"])
    old = make_task()
    old.step, old.skipped_steps, old.fp16_rescaled, old.fp16_scope = 4, 4, True, []
    old.on_load_checkpoint({"state_dict": {}})  # a checkpoint without the task's state: a fresh start
    assert (old.step, old.skipped_steps, old.fp16_rescaled, old.fp16_scope) == (0, 0, False, None)
    other = make_task()
    other.frozen_checksum = "0123456789abcdef" * 4
    with pytest.raises(ValueError) as err:
        other.on_load_checkpoint(ckpt)
    assert str(err.value) == (
        "ckpt_path: the checkpoint was trained on a different base VAE encoder (checksum "
        f"{task.frozen_checksum[:12]} vs 0123456789ab); use the same model.path"
    )


# ------------------------------------------------------------------------------------------------ generator terms


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_the_perceptual_term_enters_only_with_a_positive_weight(weight):
    loss = LossConfig("l1", 2.0, PerceptualConfig(weight=weight))
    task = make_task(perceptual=AbsLPIPS(), loss=loss, disc=DiscConfig(enabled=False))
    x, x_hat = pixels(2, seed=1), pixels(2, seed=2)
    nll, g, factor, logs = task.generator_terms(x, x_hat)
    l1, p = float((x - x_hat).abs().mean()), float((x - x_hat).abs().mean())
    assert float(nll) == pytest.approx(2.0 * l1 + weight * p, rel=1e-6) and (g, factor) == (None, 0.0)
    assert ("lpips" in logs) == (weight > 0)
    if weight:
        assert float(logs["lpips"]) == pytest.approx(p, rel=1e-6)


@pytest.mark.parametrize("ramp", ["linear", "cosine"])
def test_the_adversarial_factor_follows_the_configured_ramp(ramp):
    task = make_task(disc=DiscConfig(start=2, warmup_steps=1, ramp_steps=4, ramp=ramp, ndf=8, n_layers=2))
    got = []
    for step in range(2, 9):
        task.step = step
        got.append(task.adv_factor())
    t = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # D starts at 2, G's term after 1 warm-up step: t = 1/4 at step 3
    want = t if ramp == "linear" else [0.5 * (1 - math.cos(math.pi * v)) for v in t]
    assert got == pytest.approx(want)


@pytest.mark.parametrize(("rec_weight", "cap"), [(1e-6, 1e4), (2.0, None)], ids=["below-one", "capped"])
def test_the_adaptive_weight_is_the_norm_ratio_clamped_to_zero_and_its_maximum(rec_weight, cap):
    """d_weight = clamp(||grad_W rec|| / (||grad_W gan|| + 1e-4), 0, max) * weight at decoder.conv_out.weight."""
    disc = DiscConfig(ndf=8, n_layers=2, norm="none", adaptive=True, weight=0.5)
    task = make_task(disc=disc, loss=LossConfig("l1", rec_weight, PerceptualConfig(weight=0.0)))
    x = pixels(2, seed=3)
    z = task.posterior(x)[0]
    x_hat = task.decode(z)
    last = task.vae.decoder.conv_out.weight
    rec = rec_weight * (x_hat - x).abs().mean()
    for p in task.disc.parameters():
        p.requires_grad_(False)
    adv = -task.disc(x_hat).mean()
    for p in task.disc.parameters():
        p.requires_grad_(True)
    ratio = float(
        torch.linalg.vector_norm(torch.autograd.grad(rec, last, retain_graph=True)[0])
        / (torch.linalg.vector_norm(torch.autograd.grad(adv, last, retain_graph=True)[0]) + 1e-4)
    )
    if cap is None:
        cap = ratio / 3
        task.config.disc.max_adaptive_weight = cap
    assert (ratio < 1) == (rec_weight < 1)
    _, logs = task.generator_output_grad(x, task.decode(z))
    assert float(logs["d_weight"]) == pytest.approx(min(ratio, cap) * 0.5, rel=1e-4)


def test_the_missing_perceptual_model_message_and_the_default_flag():
    config = VAETaskConfig(loss=LossConfig(perceptual=PerceptualConfig(weight=1.5)))
    with pytest.raises(ValueError) as err:
        VAEDecoderTask(tiny_vae(), config, None)
    assert str(err.value) == (
        "loss.perceptual.weight=1.5 needs an LPIPS model; set "
        "loss.perceptual.weights=/path/to/vgg16.pth or loss.perceptual.weight=0"
    )
    task = VAEDecoderTask(tiny_vae(), config, AbsLPIPS())
    assert task.perceptual_is_random is False  # a given model is a real one unless told: val/lpips_vgg is logged
    trainer = StandIn(task)
    task.validation_step({"pixels": pixels(2)}, 0)
    assert "val/lpips_vgg" in trainer.logged


def test_training_steps_encode_each_indexed_image_once_through_the_cache():
    task = make_task(max_steps=5)
    task.config.posterior.cache = True
    StandIn(task)
    x = pixels(2, seed=6)
    task.training_step({"pixels": x, "index": torch.tensor([7, 3])}, 0)
    assert sorted(task.posterior_cache) == [3, 7]
    with torch.no_grad():
        want = task.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(task.posterior_cache[7][0], want[0], rtol=1e-5, atol=1e-6)
    task.training_step({"pixels": torch.zeros(2, 3, 16, 16), "index": torch.tensor([3, 7])}, 1)
    torch.testing.assert_close(task.posterior_cache[3][0], want[1], rtol=1e-5, atol=1e-6)  # not encoded again


def test_a_validation_epoch_without_batches_logs_nothing(monkeypatch):
    task = make_task()
    trainer = StandIn(task)
    panels = []
    monkeypatch.setattr(vae_module, "log_image_panel", lambda *a: panels.append(a))
    task.on_validation_epoch_end()
    assert panels == [] and trainer.logged == {} and task.colour_check is None
