"""Audit (issue 14, mutation survivors): the hypernetwork task's options, optimizer and training hooks, checked
through a short Lightning fit on the tiny model (fast: three steps on 8x8 latents)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import load_components
from hyperlit.tasks.hypernetwork.module import HypernetworkTask

SIZES = [48, 32, 64]  # the tiny UNet's cross-attention context width and self-attention widths


def hn() -> Hypernetwork:
    torch.manual_seed(0)
    return Hypernetwork(HypernetworkConfig(), sizes=SIZES)


def plain(**kw) -> HypernetworkTask:
    return HypernetworkTask(hn(), SimpleNamespace(prediction_type="epsilon"), functools.partial(torch.optim.SGD), **kw)


def test_defaults():
    t = plain()
    assert (t.learning_rate, t.lr_scheduler_name, t.lr_warmup_steps, t.max_steps) == (1e-5, "constant", 0, 1000)
    assert (t.noise_offset, t.initial_step, t.min_snr_gamma, t.prediction_type) == (0.0, 0, None, "epsilon")
    plain().on_train_start()  # no checkpoint was loaded: nothing to restore, no error


def test_option_messages_and_edges():
    with pytest.raises(ValueError) as err:
        plain(prediction_type="sample")
    assert str(err.value) == "train.prediction_type: 'sample' is not supported; allowed: epsilon, v_prediction"
    assert plain(min_snr_gamma=0.5).min_snr_gamma == 0.5  # any gamma > 0 is allowed, also below 1
    assert plain(noise_offset=0.0).noise_offset == 0.0


def test_configure_optimizers_trains_only_the_hypernetwork_on_the_schedule():
    t = plain(learning_rate="1e-3:2, 1e-4:4", max_steps=10)
    conf = t.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert [id(p) for g in opt.param_groups for p in g["params"]] == [id(p) for p in t.hypernetwork.parameters()]
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-4])
    t = plain(learning_rate=1.0, lr_scheduler="linear", lr_warmup_steps=2, max_steps=4)
    opt = t.configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["lr"] == 0.0  # warm-up starts at 0: the warm-up steps reached the scheduler


@pytest.fixture(scope="module")
def components():
    return load_components(family="tiny")


class Probe(pl.Callback):
    """Records the hypernetwork's step and gradient norm and the logged values at every step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []
        self.logged: list[dict] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # noqa: ANN001
        grads = [p.grad.flatten() for p in module.hypernetwork.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        # callbacks run before the module's own batch-end hook, so the previous step is read at the next start
        self.record(trainer, module)

    def record(self, trainer, module) -> None:  # noqa: ANN001
        self.steps.append(module.hypernetwork.step)
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_three_steps_follow_the_schedule_log_the_gradient_norm_and_restore_the_unet(components):
    g = torch.Generator().manual_seed(0)
    batches = [
        {"latents": torch.randn(2, 4, 8, 8, generator=g), "context": torch.randn(2, 77, 48, generator=g)}
        for _ in range(3)
    ]
    before = dict(components.unet.attn_processors)
    task = HypernetworkTask(
        hn(), components, functools.partial(torch.optim.SGD), learning_rate="1e-2:2, 1e-3:10", max_steps=3,
        initial_step=100,
    )  # fmt: skip
    probe = Probe()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(task, DataLoader(batches, batch_size=None))
    probe.record(trainer, task)  # after the last step
    probe.steps, probe.logged = probe.steps[1:], probe.logged[1:]  # before the first step nothing is logged yet
    assert probe.steps == [101, 102, 103]  # A1111's step: the init_from file's steps + this run's
    # train/lr is logged after the scheduler stepped: the rate of the *next* step (indices 1, 2, 3)
    assert [d["train/lr"] for d in probe.logged] == pytest.approx([1e-2, 1e-3, 1e-3])
    assert [d["train/grad_norm"] for d in probe.logged] == pytest.approx(probe.grad_norms, rel=1e-5)
    assert "train/samples_per_s" not in probe.logged[0] and probe.logged[1]["train/samples_per_s"] > 0
    assert all(d["train/loss"] > 0 for d in probe.logged)
    # after fit the UNet has exactly its original attention processors back (attach at start, detach at end)
    after = components.unet.attn_processors
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)
