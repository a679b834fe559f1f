"""`val/loss` reaches the loggers at the step it scores, and held-out prompts are fixed by content (fast: the
score itself and the EMA swap replaced by stand-ins, no model)."""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import pytest
import torch

from hyperlit.callbacks import validation
from hyperlit.data.heldout import held_out_prompt


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.calls.append((metrics, step))


def test_val_loss_is_logged_at_the_step_it_scores(monkeypatch) -> None:
    scores = iter([0.5, 0.25])
    monkeypatch.setattr(validation, "validation_loss", lambda module, held, timesteps: next(scores))
    monkeypatch.setattr(validation, "averaged_weights", lambda *a, **k: contextlib.nullcontext())
    loggers = [Recorder(), Recorder()]
    trainer = SimpleNamespace(
        global_step=50, datamodule=SimpleNamespace(held_out=[object()]), loggers=loggers, callback_metrics={},
        is_global_zero=True,
    )  # fmt: skip
    logged = []
    module = SimpleNamespace(log=lambda name, value, **kw: logged.append((name, value, trainer.global_step)))
    callback = validation.ValidationLoss(every=50)
    callback.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 60  # not a multiple of `every`: nothing
    callback.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 73
    callback.on_train_end(trainer, module)
    for logger in loggers:
        assert logger.calls == [({"val/loss": 0.5}, 50), ({"val/loss": 0.25}, 73)]
    assert logged == [("val/loss", 0.5, 50)]
    assert callback.scores == {50: 0.5, 73: 0.25}
    assert trainer.callback_metrics["val/loss"] == torch.tensor(0.25, dtype=torch.float64)


def test_held_out_prompts_are_chosen_by_content() -> None:
    lines = [f"a photo of [filewords], style {i}" for i in range(10)]
    shas = [f"{i:064x}" for i in range(40)]
    prompts = [held_out_prompt(lines, "a cat", "cat.png", sha) for sha in shas]
    assert prompts == [held_out_prompt(lines, "a cat", "cat.png", sha) for sha in shas]  # the same every time
    assert len(set(prompts)) > 5  # each image its own template line, not one line for all
    assert all(p.startswith("a photo of a cat, style ") for p in prompts)


def stand_ins(monkeypatch, held_out: tuple | None = ("image",)):
    """A trainer with a recording logger, a module recording `log` calls, and the score counting its calls."""
    calls = {"scores": [], "averaged": [], "logged": []}

    def score(module, held, timesteps):
        calls["scores"].append(timesteps)
        return 0.125 * len(calls["scores"])

    @contextlib.contextmanager
    def averaged(*args, **kwargs):
        calls["averaged"].append((args, kwargs))
        yield

    monkeypatch.setattr(validation, "validation_loss", score)
    monkeypatch.setattr(validation, "averaged_weights", averaged)
    datamodule = SimpleNamespace(held_out=list(held_out)) if held_out is not None else SimpleNamespace()
    trainer = SimpleNamespace(
        global_step=0, datamodule=datamodule, loggers=[Recorder()], callback_metrics={}, is_global_zero=True
    )
    module = SimpleNamespace(log=lambda name, value, **kw: calls["logged"].append((name, value, kw)))
    return trainer, module, calls


def test_scores_at_step_0_every_n_steps_and_once_per_step(monkeypatch) -> None:
    trainer, module, calls = stand_ins(monkeypatch)
    callback = validation.ValidationLoss(every=2, timesteps=3)
    for step in (0, 1, 2, 3, 4, 4):
        trainer.global_step = step
        callback.on_train_batch_start(trainer, module, None, 0)
    callback.on_train_end(trainer, module)  # step 4 again: already scored
    assert sorted(callback.scores) == [0, 2, 4] and calls["scores"] == [3, 3, 3]
    assert [c[1] for c in trainer.loggers[0].calls] == [0, 2, 4]
    # the progress bar and callback_metrics, per step; the loggers get it directly (at exactly this step)
    expected = {"prog_bar": True, "logger": False, "on_step": True, "on_epoch": False, "batch_size": 1}
    assert [kw for _, _, kw in calls["logged"]] == [expected] * 3
    # scored with the weights the exports hold: the averaged (EMA) ones, for validation
    assert calls["averaged"] == [((trainer, module), {"validation": True})] * 3


def test_every_0_scores_only_at_the_start_and_the_end(monkeypatch) -> None:
    trainer, module, calls = stand_ins(monkeypatch)
    callback = validation.ValidationLoss(every=0)
    for step in (0, 1, 50, 100):
        trainer.global_step = step
        callback.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 120
    callback.on_train_end(trainer, module)
    assert sorted(callback.scores) == [0, 120] and calls["scores"] == [8, 8]  # the default 8 timesteps
    assert validation.ValidationLoss().every == 50


def test_without_held_out_images_it_warns_once_and_scores_nothing(monkeypatch, caplog) -> None:
    trainer, module, calls = stand_ins(monkeypatch, held_out=None)  # a data module without the attribute
    callback = validation.ValidationLoss(every=1)
    with caplog.at_level(logging.WARNING, logger="hyperlit.callbacks.validation"):
        for step in (0, 1):
            trainer.global_step = step
            callback.on_train_batch_start(trainer, module, None, 0)
        callback.on_train_end(trainer, module)
    assert [r.getMessage() for r in caplog.records] == [
        "validation: no held-out images (data.val_count=0 or a data module without them): val/loss is not computed "
        "and sweeps fall back to train/loss"
    ]
    assert calls["scores"] == [] and callback.scores == {} and "val/loss" not in trainer.callback_metrics


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": -1}, "callbacks.validation.every: -1 is not allowed; use 0 (only at start and end) or more"),
        ({"every": True}, "callbacks.validation.every: True is not allowed; use 0 (only at start and end) or more"),
        ({"every": 2.5}, "callbacks.validation.every: 2.5 is not allowed; use 0 (only at start and end) or more"),
        ({"timesteps": 0}, "callbacks.validation.timesteps: 0 is not allowed; use an integer >= 1"),
        ({"timesteps": True}, "callbacks.validation.timesteps: True is not allowed; use an integer >= 1"),
        ({"timesteps": 2.0}, "callbacks.validation.timesteps: 2.0 is not allowed; use an integer >= 1"),
    ],
)
def test_option_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        validation.ValidationLoss(**kwargs)
    assert str(err.value) == message


def test_option_edges_are_accepted() -> None:
    callback = validation.ValidationLoss(every=0, timesteps=1)
    assert (callback.every, callback.timesteps) == (0, 1)


def test_the_final_value_is_said_without_a_step_0_value_after_a_resume(monkeypatch, caplog) -> None:
    trainer, module, _ = stand_ins(monkeypatch)
    trainer.global_step = 30  # a resumed run: no score at step 0 in this process
    with caplog.at_level(logging.INFO, logger="hyperlit.callbacks.validation"):
        validation.ValidationLoss(every=50).on_train_end(trainer, module)
    assert [r.getMessage() for r in caplog.records] == ["validation: val/loss 0.125 after 30 steps"]
