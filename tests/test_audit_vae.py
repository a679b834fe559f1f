"""Audit (issue 14): the ramp factor reaches the training gradient, the frozen checksum covers exactly the
encoder and quant_conv, and the fp16 report flags an overflowing block as unsafe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from hyperlit.tasks.vae.module import VAEDecoderTask, frozen_checksum
from hyperlit.vae.config import DiscConfig, LossConfig, PerceptualConfig, PosteriorConfig, VAETaskConfig
from hyperlit.vae.fp16 import FP16_MAX, fp16_decode_report

TINY = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY)


def ramp_task(ramp_steps: int, adaptive: bool = True) -> VAEDecoderTask:
    cfg = VAETaskConfig(
        max_steps=4,
        loss=LossConfig("l1", 2.0, PerceptualConfig(weight=0.0)),  # LPIPS is slow and not what is tested
        disc=DiscConfig(start=0, warmup_steps=0, ramp_steps=ramp_steps, ndf=8, n_layers=2, adaptive=adaptive),
        posterior=PosteriorConfig(cache=False, sample=False),
    )
    torch.manual_seed(100)
    return VAEDecoderTask(tiny_vae(), cfg, None)


def decoder_grads(task: VAEDecoderTask, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for m in task.trainable_modules() for p in m.parameters()]
    return list(torch.autograd.grad(loss, params, retain_graph=True))


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed-weight"])
def test_ramp_factor_scales_the_adversarial_gradient_the_decoder_receives(adaptive):
    task = ramp_task(ramp_steps=4, adaptive=adaptive)
    task.disc.eval()  # BatchNorm statistics must not move between the evaluations below
    task.step = 0
    r = task.adv_factor()
    assert r == 0.25  # (0 - 0 + 1) / 4: the factor is strictly between 0 and 1 here
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = task.posterior(x)[0]

    # the training path: dL/dx_hat from the task, pushed into the decoder as training_step does
    x_hat = task.decode(z)
    g_out, logs = task.generator_output_grad(x, x_hat)
    assert logs["adv_factor"].item() == r
    got = decoder_grads(task, (x_hat.float() * g_out).sum())

    # the oracle: each term written out by hand and differentiated on its own
    x_hat = task.decode(z)
    rec = 2.0 * F.l1_loss(x_hat, x)
    for p in task.disc.parameters():
        p.requires_grad_(False)
    adv = -task.disc(x_hat).mean()  # hinge generator loss
    g_rec, g_adv = decoder_grads(task, rec), decoder_grads(task, adv)
    if adaptive:
        last = task.vae.decoder.conv_out.weight
        n_rec = torch.linalg.vector_norm(torch.autograd.grad(rec, last, retain_graph=True)[0])
        n_adv = torch.linalg.vector_norm(torch.autograd.grad(adv, last, retain_graph=True)[0])
        weight = (n_rec / (n_adv + 1e-4)).clamp(0.0, task.config.disc.max_adaptive_weight) * task.config.disc.weight
    else:
        weight = torch.tensor(task.config.disc.weight)
    assert torch.allclose(logs["d_weight"], weight, rtol=1e-4)
    total = (rec + r * weight * adv).detach()
    assert torch.allclose(logs["total"], total, rtol=1e-5)
    for a, b, c in zip(got, g_rec, g_adv, strict=True):
        expected = b + r * weight * c
        assert torch.allclose(a, expected, rtol=1e-4, atol=1e-7)
    # and the adversarial part is really there (not lost in the tolerance): without it the gradient differs
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(got, g_rec, strict=True))


def test_frozen_checksum_covers_exactly_the_encoder_and_quant_conv():
    vae = tiny_vae()
    base = frozen_checksum(vae)
    names = list(vae.state_dict())
    assert any(n.startswith("quant_conv.") for n in names)
    state = vae.state_dict()  # its tensors share storage with the parameters
    for name in names:
        saved = state[name].clone()
        with torch.no_grad():
            state[name].add_(1.0)
        changed = frozen_checksum(vae) != base
        with torch.no_grad():
            state[name].copy_(saved)
        assert changed == name.startswith(("encoder.", "quant_conv.")), name


def test_resume_refuses_a_checkpoint_from_a_different_quant_conv():
    task = ramp_task(ramp_steps=0)
    ckpt = {"state_dict": {}}
    task.on_save_checkpoint(ckpt)
    other = ramp_task(ramp_steps=0)
    with torch.no_grad():
        other.vae.quant_conv.weight.mul_(2.0)
    other.frozen_checksum = frozen_checksum(other.vae)
    with pytest.raises(ValueError, match="different base VAE encoder"):
        other.on_load_checkpoint(ckpt)
    task.on_load_checkpoint(ckpt)  # the same model resumes


def test_fp16_report_flags_an_overflowing_block_unsafe_and_normal_blocks_safe():
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        # oracle: the fp32 output of conv_in, computed without the report; its largest value overflows fp16
        ref = vae.decoder.conv_in(vae.post_quant_conv(z))
    assert float(ref.abs().max()) > FP16_MAX
    stats = {s.name: s for s in fp16_decode_report(vae, z)}
    bad = stats["decoder.conv_in"]
    assert bad.nonfinite > 0 and not bad.safe
    assert bad.max_abs <= FP16_MAX  # only finite values are in max_abs
    good = stats["post_quant_conv"]  # before the overflow: a normal block
    assert good.nonfinite == 0 and good.safe
    with torch.no_grad():
        expected = float(vae.post_quant_conv(z).abs().max())
    assert good.max_abs == pytest.approx(expected, rel=1e-2)


# ------------------------------------------------------------------------- the fp16 callback


class _Trainer:
    is_global_zero = True
    global_step = 0

    def __init__(self, callbacks=()) -> None:
        self.callbacks = list(callbacks)


class _Task(torch.nn.Module):
    """What FP16Check needs from the VAE task: ``vae``, ``diverged`` and ``fp16_check_latents``."""

    def __init__(self, vae: AutoencoderKL, z: torch.Tensor) -> None:
        super().__init__()
        self.vae, self.z, self.diverged = vae, z, None

    def fp16_check_latents(self, trainer) -> torch.Tensor:  # noqa: ANN001
        return self.z


def _conv_in_max(vae: AutoencoderKL, z: torch.Tensor) -> float:
    with torch.no_grad():
        return float(vae.decoder.conv_in(vae.post_quant_conv(z)).abs().max())


def test_fp16_callback_warns_above_the_margin_and_passes_below(caplog):
    import logging

    from hyperlit.callbacks.fp16 import FP16Check

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae = tiny_vae()
    check = FP16Check(margin=0.5)
    with caplog.at_level(logging.INFO, logger="hyperlit"):
        check.on_train_end(_Trainer(), _Task(vae, z))
    assert check.stats is not None and all(s.safe for s in check.stats)
    assert "fp16 decode check passed" in caplog.text and "NOT fp16-safe" not in caplog.text

    # finite in fp16 but above margin * 65504: flagged, though no value overflowed
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(0.8 * FP16_MAX / _conv_in_max(vae, z))
        vae.decoder.conv_in.bias.zero_()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hyperlit"):
        check.on_train_end(_Trainer(), _Task(vae, z))
    conv_in = next(s for s in check.stats if s.name == "decoder.conv_in")
    assert conv_in.safe and 0.5 * FP16_MAX < conv_in.max_abs < FP16_MAX
    assert "NOT fp16-safe (decoder.conv_in" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hyperlit"):
        FP16Check(margin=0.9).on_train_end(_Trainer(), _Task(vae, z))  # the same decoder under a wider margin
    assert "fp16 decode check passed" in caplog.text and "NOT fp16-safe" not in caplog.text


def test_fp16_callback_checks_the_ema_weights_and_skips_when_disabled_or_diverged():
    from hyperlit.callbacks.ema import EMA
    from hyperlit.callbacks.fp16 import FP16Check

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    task = _Task(tiny_vae(), z)
    ema = EMA(decay=0.5, warmup=False)
    ema.on_fit_start(_Trainer(), task)
    ema.shadow["vae.decoder.conv_in.weight"].mul_(1e5)  # only the averaged weights overflow
    check = FP16Check()
    check.on_train_end(_Trainer([ema]), task)
    assert not next(s for s in check.stats if s.name == "decoder.conv_in").safe
    assert torch.equal(task.vae.decoder.conv_in.weight, tiny_vae().decoder.conv_in.weight)  # live weights back
    off = FP16Check(enabled=False)
    off.on_train_end(_Trainer(), task)
    task.diverged = "NaN"
    diverged = FP16Check()
    diverged.on_train_end(_Trainer(), task)
    assert off.stats is None and diverged.stats is None


# ------------------------------------------------------------------------- loss helpers (mutation survivors)


def test_cosine_ramp_follows_half_a_cosine():
    from hyperlit.vae.losses import adversarial_factor

    # start 10 + warm-up 2 = 12; 4 ramp steps: t = 1/4, 2/4, 3/4, 1 at steps 12..15
    got = [adversarial_factor(s, 10, 2, 4, "cosine") for s in range(11, 17)]
    expected = [0.0] + [0.5 * (1 - math.cos(math.pi * t)) for t in (0.25, 0.5, 0.75, 1.0)] + [1.0]
    assert got == pytest.approx(expected)
    assert got[1] == pytest.approx(0.1464466, abs=1e-6)  # below the linear ramp's 0.25 early on


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda L: L.reconstruction_loss(torch.zeros(1), torch.zeros(1), "huber"),
         "loss.reconstruction='huber' is not supported; allowed: l1, mse"),
        (lambda L: L.discriminator_loss(torch.zeros(1), torch.zeros(1), "wgan"),
         "disc.loss='wgan' is not supported; allowed: hinge, non_saturating"),
        (lambda L: L.generator_loss(torch.zeros(1), "wgan"),
         "disc.loss='wgan' is not supported; allowed: hinge, non_saturating"),
        (lambda L: L.adversarial_factor(0, 0, 0, 1, "step"),
         "disc.ramp='step' is not supported; allowed: linear, cosine"),
    ],
)  # fmt: skip
def test_loss_option_errors_name_the_key_the_value_and_the_choices(call, message):
    from hyperlit.vae import losses

    with pytest.raises(ValueError) as err:
        call(losses)
    assert str(err.value) == message


def test_fp16_callback_messages_carry_the_report(caplog):
    import logging

    from hyperlit.callbacks.fp16 import FP16Check
    from hyperlit.vae.fp16 import format_report

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    class Strict(_Task):
        def fp16_check_latents(self, trainer) -> torch.Tensor:  # noqa: ANN001
            assert isinstance(trainer, _Trainer)  # the latents come from the trainer's data
            return self.z

    check = FP16Check()
    with caplog.at_level(logging.INFO, logger="hyperlit"):
        check.on_train_end(_Trainer(), Strict(tiny_vae(), z))
    names = [s.name for s in check.stats]
    assert names[-2:] == ["decoder.conv_norm_out", "decoder.conv_out"]
    report = format_report(check.stats)
    assert report.split("\n") == [
        f"  {s.name:<26} max|x| {s.max_abs:>12.4g}  inf/nan {s.nonfinite}" for s in check.stats
    ]
    peak = max(check.stats, key=lambda s: s.max_abs)  # the verdict's peak, found here from the stats directly
    headroom = "well below the fp16 range" if peak.max_abs * 8 <= 65504 else "less than 8x headroom"
    assert (
        f"fp16 decode check passed (fp16 max 65504; peak {peak.max_abs:.4g} in {peak.name}: {headroom}):\n{report}"
        in caplog.messages
    )

    vae = tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hyperlit"):
        check.on_train_end(_Trainer(), Strict(vae, z))
    unsafe = ", ".join(s.name for s in check.stats if not s.safe or s.max_abs > 0.5 * FP16_MAX)
    assert unsafe.startswith("decoder.conv_in")
    assert caplog.messages == [
        f"the decoder is NOT fp16-safe ({unsafe}): decode it in fp32 (A1111 --no-half-vae, diffusers "
        f"force_upcast=True)\n{format_report(check.stats)}"
    ]

    class NoImages(_Task):
        def fp16_check_latents(self, trainer) -> None:  # noqa: ANN001
            return None

    caplog.clear()
    nothing = FP16Check()
    with caplog.at_level(logging.INFO, logger="hyperlit"):
        nothing.on_train_end(_Trainer(), NoImages(tiny_vae(), z))
    assert nothing.stats is None and caplog.messages == ["fp16 check skipped: no validation images"]


def test_fp16_callback_defaults_and_a_module_without_a_divergence_flag():
    from hyperlit.callbacks.fp16 import FP16Check

    assert (FP16Check().enabled, FP16Check().margin) == (True, 0.5)
    task = _Task(tiny_vae(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    del task.diverged  # the attribute is optional: a module that cannot diverge is simply checked
    check = FP16Check()
    check.on_train_end(_Trainer(), task)
    assert check.stats is not None
