"""Options a `train.py` run must honour, checked through the same path a run takes (compose -> task build -> module).

Round two of "tests that catch": a value the task's own unit tests see but a run drops is a bug the user never sees
until the result is wrong, so these go through `hyperlit.tasks.TASKS[...]` from a composed config.
"""

from __future__ import annotations

import pytest
import torch

from hyperlit import models
from hyperlit.runner import build_run
from hyperlit.tasks import TASKS


def test_a_runs_timestep_range_reaches_the_drawn_timesteps(train_cfg, monkeypatch):
    cfg = train_cfg("model.tiny_random=true", "train.min_timestep=100", "train.max_timestep=110")
    module = TASKS["hypernetwork"](cfg).load_module()
    drawn: list[torch.Tensor] = []

    def record(latents, noise, timesteps, cond, weight):
        drawn.append(timesteps.clone())
        return torch.zeros(latents.shape[0])

    monkeypatch.setattr(module, "loss_at", record)
    monkeypatch.setattr(module, "condition_for", lambda batch: None)
    module.compute_loss({"latents": torch.zeros(400, 4, 8, 8)}, generator=torch.Generator().manual_seed(0))
    assert set(drawn[0].tolist()) == set(range(100, 110))  # every timestep of [100, 110), none outside


def gain_group_lr(module) -> float:
    gains = {id(p) for p in module.gains.parameters()}
    (optimizer, *_) = module.configure_optimizers()
    (lr,) = {g["lr"] for g in optimizer.param_groups if {id(p) for p in g["params"]} <= gains}
    return lr


def test_fp16_fix_gain_lr_reaches_the_gains_optimizer(vae_cfg):
    cfg = vae_cfg("vae_loss=fp16_fix", "loss.fp16_fix.gain_lr=0.0123", "train.optimizer.lr=3e-5")
    module = TASKS["vae"](cfg).load_module()
    assert gain_group_lr(module) == pytest.approx(0.0123)  # not the decoder's 3e-5


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was raised")

    monkeypatch.setattr(models, "load_components", refuse)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.fp16_fix.gain_lr=0", "loss.fp16_fix.gain_lr"),
        ("loss.fp16_fix.target=0", "loss.fp16_fix.target"),
        ("train.disc_lr=0", "train.disc_lr"),
    ],
)
def test_zero_is_refused_where_a_value_must_be_positive(vae_cfg, no_model_loading, override, key):
    cfg = vae_cfg("vae_loss=fp16_fix", override)
    with pytest.raises(ValueError) as err:
        build_run(cfg)
    assert str(err.value).startswith(f"{key}: 0")
