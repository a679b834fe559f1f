"""Gradient checkpointing and torch.compile change nothing that is computed (hyperlit.speed)."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers.attention_models import CROSS_LAYERS, CrossCalls, inputs, make_unet, real_hypernetwork
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from hyperlit.attention import attach_hypernetworks
from hyperlit.data.skips import SkipLog
from hyperlit.data.stream import TrainerEpochs
from hyperlit.runner import build_run, fit
from hyperlit.speed import (
    FirstCallTimer,
    compile_unet,
    enable_gradient_checkpointing,
    use_channels_last,
    warn_compile_on_cpu,
)
from hyperlit.tasks.hypernetwork import module as task_module


def step(unet: nn.Module, hn: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    hn.zero_grad(set_to_none=True)
    out = unet(**batch).sample
    out.pow(2).mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in hn.named_parameters()}


class ResnetCalls:
    """Starts of a ResNet block after the first attention layer (before it nothing needs grad, so nothing re-runs).

    A pre-hook: a recomputation stops as soon as it has rebuilt what backward needs, before the block's end.
    """

    def __init__(self, unet: nn.Module):
        self.count = 0
        self.handle = unet.up_blocks[1].resnets[0].register_forward_pre_hook(self.hit)

    def hit(self, *_: object) -> None:
        self.count += 1


@pytest.mark.parametrize("share", [True, False])
def test_checkpointing_gives_bitwise_equal_gradients(share):
    """Frozen UNet in eval mode, a sample that does not require grad: only the hypernetwork's leaves do."""
    hn = real_hypernetwork(seed=20).train()
    batch = inputs(20)
    results = {}
    for checkpointing in (False, True):
        unet = make_unet()
        attach_hypernetworks(unet, [hn], share_text_context=share)
        if checkpointing:
            enable_gradient_checkpointing(unet)
        resnet, cross = ResnetCalls(unet), CrossCalls(hn)
        results[checkpointing] = step(unet, hn, batch), resnet.count, cross.count
        cross.remove()
    (out_off, grads_off), resnet_off, cross_off = results[False]
    (out_on, grads_on), resnet_on, cross_on = results[True]
    assert resnet_on == 2 * resnet_off == 2  # the block really re-ran its forward in backward
    # The shared text-context K/V are computed outside every block: never recomputed. Per layer: once more each.
    assert (cross_off, cross_on) == ((1, 1) if share else (CROSS_LAYERS, 2 * CROSS_LAYERS))
    # Recomputation repeats the same float operations and backward runs the same graph: bit for bit.
    assert torch.equal(out_on, out_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        assert grads_off[name].abs().max() > 0, name
        assert torch.equal(grads_on[name], grads_off[name]), name


def test_checkpointing_is_off_under_no_grad():
    unet = make_unet()
    hn = real_hypernetwork(seed=21).eval()
    attach_hypernetworks(unet, [hn])
    enable_gradient_checkpointing(unet)
    resnet = ResnetCalls(unet)
    with torch.no_grad():
        unet(**inputs(21))
    assert resnet.count == 1


@pytest.mark.parametrize("share", [True, False])
def test_compiled_unet_has_no_graph_break_at_the_processor(share):
    """fullgraph=True raises on any graph break; the only split is pre-hook | forward (two frames)."""
    unet = make_unet()
    hn = real_hypernetwork(seed=22).train()
    attach_hypernetworks(unet, [hn], share_text_context=share)
    batch = inputs(22)
    eager_out, eager_grads = step(unet, hn, batch)
    counter = CompileCounter()
    compile_unet(unet, backend=counter, fullgraph=True)
    for _ in range(2):  # the second call reuses the graphs: no recompilation
        out, grads = step(unet, hn, batch)
    assert counter.frame_count == (2 if share else 1)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_inductor_compiled_unet_matches_eager_and_reports_compile_time_once(caplog):
    unet = make_unet()
    hn = real_hypernetwork(seed=23).train()
    attach_hypernetworks(unet, [hn])
    enable_gradient_checkpointing(unet)  # compile must compose with checkpointing and the shared K/V
    batch = inputs(23)
    eager_out, eager_grads = step(unet, hn, batch)
    compile_unet(unet)
    timer = FirstCallTimer("UNet forward + backward")
    with caplog.at_level(logging.INFO, logger="hyperlit.speed"):
        for _ in range(2):
            with timer:
                out, grads = step(unet, hn, batch)
    assert [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()] == [
        f"torch.compile: the first UNet forward + backward took {timer.seconds:.1f} s (compilation included)"
    ]
    # Inductor fuses and reorders float operations: equal within float32 rounding, not bitwise.
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max() for g in eager_grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-3, atol=1e-4 * scale)


def test_first_call_timer_logs_once_and_not_on_error(caplog):
    timer = FirstCallTimer("step")
    with caplog.at_level(logging.INFO, logger="hyperlit.speed"):
        with pytest.raises(RuntimeError), timer:
            raise RuntimeError("first call failed")
        assert timer.seconds is None
        for _ in range(3):
            with timer:
                pass
    assert timer.seconds is not None
    assert sum("torch.compile" in r.getMessage() for r in caplog.records) == 1


def test_channels_last_only_on_cuda():
    unet = make_unet()
    assert not use_channels_last(unet, torch.device("cpu"))
    assert unet.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cpu", False), (None, False)])
def test_training_batches_are_pinned_only_for_cuda(device, pinned):
    """Pinned host memory lets Lightning's non_blocking copy overlap the GPU step; on CPU it would only cost."""

    class Module(TrainerEpochs):
        trainer = (
            None if device is None else SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        )

    loader = Module().epoch_loader([{"x": torch.zeros(1)}], SkipLog(), num_workers=0)
    assert loader.pin_memory is pinned


@pytest.mark.slow
def test_training_with_checkpointing_or_compile_reaches_the_same_weights(train_cfg, tmp_path, monkeypatch, caplog):
    """The config keys reach the task; each option leaves the trained weights bit-identical."""
    # The "eager" backend runs dynamo's captured graph op by op: the wiring and the log line without a C++ build.
    monkeypatch.setattr(task_module, "compile_unet", functools.partial(compile_unet, backend="eager"))
    common = ("callbacks.preview.every=0", "callbacks.preview.at_end=false", "callbacks.export.save_every=0",
              "train.learning_rate=1e-3")  # fmt: skip
    weights = {}
    for name, option in [
        ("plain", None),
        ("ckpt", "train.gradient_checkpointing=true"),
        ("compile", "train.compile=true"),
    ]:
        overrides = [*common, f"paths.output_dir={tmp_path / name}"] + ([option] if option else [])
        cfg = train_cfg(*overrides, steps=2)
        with caplog.at_level(logging.INFO, logger="hyperlit.speed"):
            run = build_run(cfg)
            fit(run, cfg)
        weights[name] = run.module.hypernetwork.state_dict()
        unet = run.module.components.unet
        assert not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())  # restored after fit
    compile_logs = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(compile_logs) == 1 and "first training step" in compile_logs[0]
    cpu_warnings = [r for r in caplog.records if r.getMessage().startswith("train.compile=true on the CPU")]
    assert len(cpu_warnings) == 1 and cpu_warnings[0].levelno == logging.WARNING  # only the compiled run warns
    for name in ("ckpt", "compile"):
        for key, value in weights["plain"].items():
            assert torch.equal(weights[name][key], value), (name, key)


def test_compile_warns_on_the_cpu_only(caplog):
    with caplog.at_level(logging.WARNING, logger="hyperlit.speed"):
        assert warn_compile_on_cpu(torch.device("cuda", 0)) is False  # no CUDA needed to name the device
        assert warn_compile_on_cpu(torch.device("meta")) is False
        assert caplog.records == []
        assert warn_compile_on_cpu(torch.device("cpu")) is True
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "2.1x slower than eager" in record.getMessage()
    assert "train.compile=false" in record.getMessage()
