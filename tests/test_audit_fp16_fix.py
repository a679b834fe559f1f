"""fp16_fix's parts checked one by one against references computed another way (fast: one tiny decoder, no
training): the layers it scales, what a gain does to a layer (against a copy with the weights scaled by hand),
folding, the per-sample peaks the monitor records, and the loss and penalty values from their formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from hyperlit.models.tiny import build_tiny
from hyperlit.vae.fp16 import FP16_MAX, HEADROOM
from hyperlit.vae.fp16_fix import ActivationMonitor, Fp16FixLoss, LayerGains, activation_penalty, decoder_layers


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return build_tiny(0)[1].eval().requires_grad_(False)


def latents(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(3))


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


def drop_bias(layer: nn.Module) -> None:
    layer.register_parameter("bias", None)


def test_decoder_layers_are_post_quant_conv_and_every_conv_and_linear_of_the_decoder(vae) -> None:
    expected = ["post_quant_conv"] + [
        f"decoder.{n}" for n, m in vae.decoder.named_modules() if type(m) in (nn.Conv2d, nn.Linear)
    ]
    layers = list(decoder_layers(vae))
    assert [n for n, _ in layers] == expected
    modules = dict(vae.named_modules())
    assert all(m is modules[n] for n, m in layers)
    assert any(isinstance(m, nn.Linear) for _, m in layers) and len(layers) == 31
    vae.post_quant_conv = None  # a VAE without one (use_post_quant_conv=False) starts at decoder.conv_in
    assert [n for n, _ in decoder_layers(vae)] == expected[1:]
    decoder_only = nn.Module()  # a model with a decoder and no post_quant_conv attribute at all
    decoder_only.decoder = vae.decoder
    assert [n for n, _ in decoder_layers(decoder_only)] == expected[1:]


def test_gains_act_as_the_layers_with_scaled_weight_and_bias_and_fold_into_them(vae) -> None:
    drop_bias(vae.decoder.conv_out)  # one layer without a bias: only its weight gain applies
    drop_bias(vae.decoder.mid_block.attentions[0].to_q)
    z = latents()
    before = decode(vae, z)
    gains = LayerGains(vae)
    names = [n for n, _ in decoder_layers(vae)]
    assert sorted(gains.log_gains) == sorted(n.replace(".", "__") for n in names)
    assert all(p.shape == (2,) and not p.any() for p in gains.log_gains.values())
    assert not [n for n, _ in vae.named_parameters() if "log_gains" in n]  # the VAE's own state is unchanged

    gen = torch.Generator().manual_seed(5)
    reference = copy.deepcopy(vae)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name in names:
            g = torch.randn(2, generator=gen) * 0.3
            gains.log_gains[name.replace(".", "__")].copy_(g)
            modules[name].weight.mul_(math.exp(g[0]))
            if modules[name].bias is not None:
                modules[name].bias.mul_(math.exp(g[1]))
    expected = decode(reference, z)
    assert (expected - before).abs().max() > 0.05  # the gains matter

    with gains.applied():
        torch.testing.assert_close(decode(vae, z), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(decode(vae, z), before)  # outside applied(): the plain layers

    gains.fold()
    assert all(not p.any() for p in gains.log_gains.values())
    torch.testing.assert_close(decode(vae, z), expected, atol=1e-5, rtol=1e-4)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(dict(vae.named_parameters())[name], p, atol=1e-6, rtol=1e-5)


def test_gain_hooks_run_before_other_hooks(vae) -> None:
    gains = LayerGains(vae)
    seen = {}
    vae.decoder.conv_in.register_forward_hook(lambda _m, _i, out: seen.update(peak=out.abs().max()))
    with torch.no_grad():
        gains.log_gains["decoder__conv_in"].fill_(math.log(10.0))
    z = latents()
    decode(vae, z)
    plain = seen["peak"]
    with gains.applied():
        decode(vae, z)
    torch.testing.assert_close(seen["peak"], 10 * plain, rtol=1e-5, atol=0)


def test_monitor_records_each_samples_peak_of_every_layer_resnet_and_attention(vae) -> None:
    monitor = ActivationMonitor(vae)
    expected_names = {n for n, _ in decoder_layers(vae)} | {
        f"decoder.{n}" for n, m in vae.decoder.named_modules() if isinstance(m, (ResnetBlock2D, Attention))
    }
    z = latents(3)
    z[1] *= 5  # samples of different magnitude: a peak over the whole batch would not match per sample
    reference = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: reference.__setitem__(n, out.detach().clone()))
        for n, m in vae.named_modules()
        if n in expected_names
    ]
    decode(vae, z)
    for h in hooks:
        h.remove()
    assert set(monitor.peaks) == expected_names
    for name, peaks in monitor.peaks.items():
        out = reference[name]
        assert peaks.shape == (3,)
        for i in range(3):
            assert peaks[i] == out[i].abs().max(), name

    monitor.clear()
    assert monitor.peaks == {}
    monitor.remove()
    decode(vae, z)
    assert monitor.peaks == {}  # removed hooks record nothing


def test_activation_penalty_is_the_mean_of_squared_log_excess() -> None:
    t = 10.0
    peaks = {"a": torch.tensor([4 * t, t / 2]), "b": torch.tensor([t, math.e * t]), "c": torch.tensor([0.0, 0.0])}
    # a: (ln 4)^2 and 0 -> mean (ln 4)^2 / 2; b: 0 and 1 -> 1/2; c: nothing above; mean over the three modules
    expected = (math.log(4) ** 2 / 2 + 0.5 + 0.0) / 3
    assert activation_penalty(peaks, t).item() == pytest.approx(expected, rel=1e-6)
    assert activation_penalty({"a": torch.tensor([t / 3])}, t).item() == 0.0
    # peaks below 1 count as they are (a zero peak is floored far below any target, not at 1)
    small = {"a": torch.tensor([0.1, 0.0])}
    assert activation_penalty(small, 0.01).item() == pytest.approx(math.log(10) ** 2 / 2, rel=1e-6)


def test_fp16_fix_loss_is_relative_mse_plus_weighted_penalty() -> None:
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(2, 3, 4, 4, generator=gen) * 3
    student = teacher + 0.5 * torch.randn(2, 3, 4, 4, generator=gen)
    target = 100.0
    peaks = {"x": torch.tensor([target * math.exp(2.0), target])}
    pen = 4.0 / 2  # (ln e^2)^2 = 4 for one sample, 0 for the other
    total, parts = Fp16FixLoss(penalty_weight=0.25, target=target)(student.half(), teacher.half(), peaks)
    st, te = student.half().float(), teacher.half().float()
    rec = ((st - te) ** 2).mean() / te.var()
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(rec.item() + 0.25 * pen, rel=1e-5)
    assert parts["teacher_mse"].item() == pytest.approx(rec.item(), rel=1e-5)
    assert parts["activation_penalty"].item() == pytest.approx(pen, rel=1e-5)
    assert Fp16FixLoss().target == FP16_MAX / HEADROOM / 2 and Fp16FixLoss().penalty_weight == 1.0
    same, _ = Fp16FixLoss()(teacher, teacher, {"x": torch.tensor([1.0])})
    assert same.item() == 0.0
    flat = torch.full((1, 3, 2, 2), 0.5)  # a constant teacher: its variance is floored at 1e-8, not divided by 0
    off, parts = Fp16FixLoss()(flat + 1e-3, flat, {"x": torch.tensor([1.0])})
    assert off.item() == pytest.approx(1e-6 / 1e-8, rel=1e-3) and math.isfinite(parts["teacher_mse"].item())
