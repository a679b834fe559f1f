"""EMA callback: warm-up decay, updates only after real updates, swap in/out, checkpoint state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperlit.callbacks.ema import EMA


class Module(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.ema_should_update = True


class FakeTrainer:
    global_step = 0
    callbacks: list = []


def test_warmup_decay_and_update_math():
    m = Module()
    ema = EMA(decay=0.999, warmup=True)
    ema.on_fit_start(FakeTrainer(), m)
    assert set(ema.shadow) == {"a.weight", "a.bias"}  # only trainable weights are averaged
    w0 = m.a.weight.detach().clone()
    with torch.no_grad():
        m.a.weight.add_(1.0)
    ema.on_train_batch_end(FakeTrainer(), m, None, None, 0)
    d = (1 + 0) / (10 + 0)  # first update: warm-up decay 0.1
    assert torch.allclose(ema.shadow["a.weight"], d * w0 + (1 - d) * (w0 + 1))
    m.ema_should_update = False  # e.g. a skipped NaN step: no update
    ema.on_train_batch_end(FakeTrainer(), m, None, None, 1)
    assert ema.num_updates == 1
    assert EMA(decay=0.5, warmup=False).current_decay() == 0.5


def test_swapped_restores_live_weights_and_state_round_trip():
    m = Module()
    ema = EMA(decay=0.5, warmup=False)
    ema.on_fit_start(FakeTrainer(), m)
    with torch.no_grad():
        m.a.weight.mul_(3.0)
    ema.update(m)
    live = m.a.weight.detach().clone()
    with ema.swapped(m):
        assert torch.equal(m.a.weight, ema.shadow["a.weight"])
    assert torch.equal(m.a.weight, live)
    other = EMA(decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.shadow["a.weight"], ema.shadow["a.weight"])
    with pytest.raises(ValueError, match="ema.decay=1.0"):
        EMA(decay=1.0)
