"""fp16-safe fine-tuning (sdxl-vae-fp16-fix method), fast form: a decoder made fp16-unsafe on purpose (same fp32
function) decodes to inf/NaN in fp16; after a short fine-tune against its own fp32 output as teacher, the fp16
report says every block is well below the fp16 range and the fp16 decode matches the teacher within 35 dB PSNR."""

from __future__ import annotations

import copy

import pytest
import torch

from hyperlit.models.tiny import build_tiny
from hyperlit.vae.fp16 import FP16_MAX, HEADROOM, decode_report, fp16_decode_report, fp16_verdict
from hyperlit.vae.fp16_fix import ActivationMonitor, Fp16FixLoss, LayerGains, make_fp16_unsafe

PSNR_FLOOR = 35.0  # dB, fp16 decode of the fixed decoder vs the teacher's fp32 decode, on [0, 1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (a.float().clamp(-1, 1) + 1) / 2, (b.float().clamp(-1, 1) + 1) / 2
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


@pytest.fixture
def unsafe():
    torch.manual_seed(0)
    vae = build_tiny(0)[1].eval()
    z = torch.randn(2, 4, 2, 2)
    with torch.no_grad():
        original = vae.decode(z).sample
    peak = fp16_verdict(decode_report(vae, z, torch.float32)).peak
    make_fp16_unsafe(vae, 4 * FP16_MAX / peak)  # the largest fp32 activation becomes 4× the fp16 maximum
    return vae, z, original


def test_unsafe_decoder_has_the_same_fp32_function_and_overflows_fp16(unsafe) -> None:
    vae, z, original = unsafe
    with torch.no_grad():
        same = vae.decode(z).sample
    torch.testing.assert_close(same, original, atol=1e-4, rtol=1e-4)
    assert fp16_verdict(decode_report(vae, z, torch.float32)).peak > 2 * FP16_MAX
    verdict = fp16_verdict(fp16_decode_report(vae, z))
    assert not verdict.finite and not verdict.well_below
    with torch.no_grad():
        half = copy.deepcopy(vae).half().decode(z.half()).sample
    assert not torch.isfinite(half).all()  # the symptom users see: NaN / black images


def test_fp16_fix_makes_it_safe_and_keeps_the_teachers_output(unsafe) -> None:
    vae, z, original = unsafe
    teacher = copy.deepcopy(vae).requires_grad_(False)
    student = copy.deepcopy(vae).requires_grad_(False)
    gains = LayerGains(student)
    opt = torch.optim.Adam(gains.parameters(), lr=0.03)
    monitor = ActivationMonitor(student)
    loss_fn = Fp16FixLoss()
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        latents = torch.randn(2, 4, 2, 2, generator=gen)
        with torch.no_grad():
            target = teacher.decode(latents).sample
        monitor.clear()
        with gains.applied():
            loss, _ = loss_fn(student.decode(latents).sample, target, monitor.peaks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gains.fold()
    monitor.remove()
    assert set(student.state_dict()) == set(vae.state_dict())  # a plain AutoencoderKL throughout

    verdict = fp16_verdict(fp16_decode_report(student, z))
    assert verdict.finite and verdict.well_below, verdict
    assert verdict.peak * HEADROOM <= FP16_MAX
    with torch.no_grad():
        half = copy.deepcopy(student).half().decode(z.half()).sample
    assert torch.isfinite(half).all()
    assert psnr(half, original) >= PSNR_FLOOR
