"""fp16_fix's closed form: decoders made fp16-unsafe by function-preserving rescales (a resnet conv1 scaled up in
different blocks, the whole residual stream scaled up) are rescaled back exactly, measured on a few latents: the
fp32 output moves by at most 1e-5, the fp16 decode is finite and well below the fp16 range, and matches the
original fp32 output at >= 45 dB. A layer that no normalisation reads (post_quant_conv) is left to fine-tuning and
reported as such; the task then fine-tunes only it and its reader."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from helpers.vae import SAMPLE
from test_vae_task_eval import fit

from hyperlit.callbacks.fp16 import Fp16ClosedForm
from hyperlit.cli import main
from hyperlit.models.tiny import build_tiny
from hyperlit.tasks.vae.module import VAEDecoderTask
from hyperlit.vae.config import Fp16FixConfig, LossConfig, PerceptualConfig, PosteriorConfig, VAETaskConfig
from hyperlit.vae.evaluate import load_eval_images
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.fp16 import FP16_MAX, HEADROOM, fp16_decode_report, fp16_verdict
from hyperlit.vae.fp16_fix import make_fp16_unsafe, scale_layer
from hyperlit.vae.fp16_rescale import fine_tune_scope, rescale_decoder, scale_groups

TARGET = 4094.0
EDGE = FP16_MAX / HEADROOM  # the largest peak still "well below" the fp16 range
CONV1S = [  # one resnet conv1 per block, scaled up 10^2 .. 10^5 beyond the edge
    ("decoder.mid_block.resnets.0.conv1", 1e2),
    ("decoder.up_blocks.0.resnets.1.conv1", 1e3),
    ("decoder.up_blocks.1.resnets.0.conv1", 1e4),
    ("decoder.up_blocks.3.resnets.1.conv1", 1e5),
]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (a.float().clamp(-1, 1) + 1) / 2, (b.float().clamp(-1, 1) + 1) / 2
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def peak_of(vae: torch.nn.Module, name: str, latents: list[torch.Tensor]) -> float:
    """The largest |output| of one module over the latents, by its own hook (independent of the library)."""
    seen: list[float] = []
    handle = dict(vae.named_modules())[name].register_forward_hook(lambda m, i, o: seen.append(float(o.abs().max())))
    with torch.no_grad():
        for z in latents:
            vae.decode(z)
    handle.remove()
    return max(seen)


def decode(vae: torch.nn.Module, z: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(vae).to(dtype).decode(z.to(dtype)).sample.float()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    vae = build_tiny(0)[1].eval()
    measured = [torch.randn(2, 4, 4, 4) for _ in range(2)]
    held_out = torch.randn(2, 4, 4, 4)  # not measured: the closed form must hold beyond its own latents
    return vae, measured, held_out


def _assert_exact_and_safe(unsafe, fixed, original, held_out) -> None:
    for z in (held_out,):
        assert (decode(fixed, z) - decode(unsafe, z)).abs().max() <= 1e-5  # fp32 function unchanged
        half = decode(fixed, z, torch.float16)
        assert torch.isfinite(half).all()
        assert psnr(half, decode(original, z)) >= 45.0
    verdict = fp16_verdict(fp16_decode_report(fixed, held_out))
    assert verdict.finite and verdict.well_below, verdict


@pytest.mark.parametrize(("layer", "beyond"), CONV1S)
def test_a_scaled_conv1_is_rescaled_back_exactly(base, layer, beyond) -> None:
    vae, measured, held_out = base
    unsafe = copy.deepcopy(vae)
    scale_layer(unsafe, layer, beyond * EDGE / peak_of(vae, layer, measured))
    assert not torch.isfinite(decode(unsafe, held_out, torch.float16)).all()  # overflows before
    peak = peak_of(unsafe, layer, measured)
    fixed = copy.deepcopy(unsafe)
    report = rescale_decoder(fixed, measured, TARGET)
    expected = 2.0 ** math.floor(math.log2(TARGET / peak))  # the largest power of two that brings it under
    assert [(c.layer, c.kind, c.weight_factor, c.bias_factor) for c in report.changes] == [
        (layer, "norm", expected, expected)
    ]
    assert report.changes[0].peak_before == pytest.approx(peak, rel=1e-6)
    assert report.left == [] and report.fp32_change <= 1e-5
    touched = dict(fixed.named_parameters())
    for name, p in unsafe.named_parameters():  # only that conv changed, by exactly the factor
        want = p * expected if name.startswith(layer + ".") else p
        assert torch.equal(touched[name], want), name
    _assert_exact_and_safe(unsafe, fixed, vae, held_out)
    lines = report.lines()
    assert len(lines) == 2 and lines[0].startswith(f"{layer}: x 2^{math.log2(expected):+.0f} (feeds a GroupNorm)")
    assert "nothing left to fine-tuning" in lines[-1]


@pytest.mark.parametrize("beyond", [1e2, 1e5])
def test_the_scaled_residual_stream_is_rescaled_back_segment_by_segment(base, beyond) -> None:
    vae, measured, held_out = base
    unsafe = copy.deepcopy(vae)
    make_fp16_unsafe(unsafe, beyond * EDGE / peak_of(vae, "decoder.mid_block.resnets.0", measured))
    fixed = copy.deepcopy(unsafe)
    report = rescale_decoder(fixed, measured, TARGET)
    changed = {c.layer for c in report.changes}
    # every producer of the stream and every conv that starts a segment; never a conv1 (its input is normalised)
    assert {
        "decoder.conv_in",
        "decoder.mid_block.attentions.0.to_out.0",
        "decoder.up_blocks.3.resnets.1.conv2",
    } <= changed
    assert not any(name.endswith("conv1") for name in changed)
    assert report.left == [] and report.peak_after <= TARGET
    _assert_exact_and_safe(unsafe, fixed, vae, held_out)


def test_groups_of_the_tiny_decoder() -> None:
    """conv1 feeds norm2 alone; conv2 only ever as part of a stream segment; segments start at conv_shortcut and the
    upsampler convs."""
    groups = scale_groups(build_tiny(0)[1])
    norm = [g for g in groups if g.kind == "norm"]
    stream = [g for g in groups if g.kind == "stream"]
    assert all(g.scaled == [g.name] and g.name.endswith(".conv1") for g in norm) and len(norm) == 10
    assert [g.entries for g in stream] == [
        [],
        ["decoder.up_blocks.0.upsamplers.0.conv"],
        ["decoder.up_blocks.1.upsamplers.0.conv"],
        ["decoder.up_blocks.2.upsamplers.0.conv"],
        ["decoder.up_blocks.3.resnets.0.conv_shortcut"],
    ]
    assert stream[0].scaled[:2] == ["decoder.conv_in", "decoder.mid_block.resnets.0.conv2"]
    assert all(g.exact for g in groups)
    scaled = [n for g in groups for n in g.scaled]
    assert len(scaled) == len(set(scaled))  # each layer in one group


def test_a_layer_no_norm_reads_is_left_to_fine_tuning(base) -> None:
    vae, measured, _ = base
    unsafe = copy.deepcopy(vae)
    scale_layer(unsafe, "post_quant_conv", 1e3 * EDGE / peak_of(vae, "post_quant_conv", measured), "decoder.conv_in")
    fixed = copy.deepcopy(unsafe)
    report = rescale_decoder(fixed, measured, TARGET)
    assert report.changes == [] and [p.layer for p in report.left] == ["post_quant_conv"]
    assert all(torch.equal(a, b) for a, b in zip(fixed.parameters(), unsafe.parameters(), strict=True))
    assert report.lines()[0].startswith("post_quant_conv: peak") and "left to fine-tuning" in report.lines()[0]
    assert "1 layers left to fine-tuning" in report.summary()
    assert fine_tune_scope(fixed, ["post_quant_conv"]) == ["post_quant_conv", "decoder.conv_in"]
    assert fine_tune_scope(fixed, ["decoder.conv_out"]) is None  # readers unknown: everything may train


def _task(vae: torch.nn.Module, steps: int, **fp16) -> VAEDecoderTask:
    cfg = VAETaskConfig(
        max_steps=steps,
        loss=LossConfig(perceptual=PerceptualConfig(weight=0.0), kind="fp16_fix", fp16_fix=Fp16FixConfig(**fp16)),
        posterior=PosteriorConfig(cache=True, sample=True),
    )
    return VAEDecoderTask(vae, cfg, None)


@pytest.mark.slow
def test_task_rescales_first_and_does_not_fine_tune_when_nothing_is_left(base, tmp_path, caplog) -> None:
    vae, measured, held_out = base
    unsafe = copy.deepcopy(vae)
    layer = "decoder.up_blocks.1.resnets.0.conv1"
    scale_layer(unsafe, layer, 1e4 * EDGE / peak_of(vae, layer, measured))
    task = _task(copy.deepcopy(unsafe), steps=20)
    with caplog.at_level(logging.INFO):
        fit(task, tmp_path, [Fp16ClosedForm()], val_every=100)
    assert task.step == 0 and task.fp16_scope == [] and task.fp16_rescaled
    assert f"fp16 closed form: {layer}: x 2^" in caplog.text and "nothing to fine-tune" in caplog.text
    _assert_exact_and_safe(unsafe, task.vae.cpu(), vae, held_out)
    state: dict = {"state_dict": {}}
    task.on_save_checkpoint(state)
    resumed = _task(copy.deepcopy(task.vae), steps=20)
    resumed.on_load_checkpoint(state)
    before = [p.clone() for p in resumed.vae.parameters()]
    assert resumed.fp16_closed_form(None) is None  # a resumed run does not rescale again
    assert all(torch.equal(a, b) for a, b in zip(before, resumed.vae.parameters(), strict=True))
    assert resumed.fp16_scope == []


@pytest.mark.slow
def test_task_fine_tunes_only_what_the_closed_form_left(base, tmp_path) -> None:
    vae, measured, held_out = base
    unsafe = copy.deepcopy(vae)
    scale_layer(unsafe, "post_quant_conv", 1e2 * EDGE / peak_of(vae, "post_quant_conv", measured), "decoder.conv_in")
    task = _task(copy.deepcopy(unsafe), steps=120)
    fit(task, tmp_path, [Fp16ClosedForm()], val_every=1000)
    assert task.step == 120 and task.fp16_scope == ["post_quant_conv", "decoder.conv_in"]
    after = dict(task.vae.cpu().named_parameters())
    for name, p in unsafe.named_parameters():
        if name in ("post_quant_conv.weight", "decoder.conv_in.weight"):
            assert not torch.equal(after[name], p), name  # rescaled by fine-tuning
        elif name.startswith(("post_quant_conv.", "decoder.conv_in.")):
            continue
        else:
            assert torch.equal(after[name], p), name  # outside the scope: bit-identical
    assert torch.isfinite(decode(task.vae, held_out, torch.float16)).all()
    assert peak_of(task.vae, "post_quant_conv", measured) < peak_of(unsafe, "post_quant_conv", measured) / 10


def test_eval_vae_shows_the_fp16_fidelity_against_the_first_model(base, tmp_path, capsys) -> None:
    """`eval-vae --fp16`: the original (first), its unsafe rescale (nan: overflows) and the closed form's fix (>= 45 dB
    against the original's fp32 output), equal to a direct computation."""
    vae, measured, _ = base
    layer = "decoder.up_blocks.0.resnets.1.conv1"
    unsafe = copy.deepcopy(vae)
    scale_layer(unsafe, layer, 1e3 * EDGE / peak_of(vae, layer, measured))
    fixed = copy.deepcopy(unsafe)
    rescale_decoder(fixed, measured, TARGET)
    paths = [str(save_diffusers_folder(v, tmp_path / n)) for n, v in (("a", vae), ("b", unsafe), ("c", fixed))]
    argv = ["eval-vae", "--data", str(SAMPLE), "--resolution", "16", "--limit", "3", "--fp16"]
    for path in paths:
        argv += ["--model-path", path]
    assert main([*argv, "--json"]) == 0
    scores = [m["fp16_psnr"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert scores[0] >= 45.0 and math.isnan(scores[1]) and scores[2] >= 45.0
    x = load_eval_images(SAMPLE, 16, 3).pixels.float().div(127.5).sub(1.0)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        want = decode(vae, z).clamp(-1, 1)
        got = decode(fixed, z, torch.float16).clamp(-1, 1)
    direct = float((-10 * torch.log10(((got - want) / 2).pow(2).flatten(1).mean(1))).mean())
    assert scores[2] == pytest.approx(direct, abs=1e-3)
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "fp16 PSNR" in table and f"against {paths[0]}'s fp32 decode" in table and " nan" in table
