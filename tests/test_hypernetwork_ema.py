"""callbacks.ema on the hypernetwork task: off by default (A1111 exports the raw weights); on, the exports,
previews and val/loss all hold the average, which a resumed run continues exactly."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.config import compose_config

from hyperlit import files
from hyperlit.attention import attach_hypernetworks, detach_hypernetworks
from hyperlit.callbacks.ema import EMA
from hyperlit.callbacks.preview import PreviewImages
from hyperlit.callbacks.validation import ValidationLoss, validation_loss
from hyperlit.runner import build_run, fit

pytestmark = pytest.mark.slow


class RecordWeights(L.Callback):
    """The live hypernetwork weights at the start and after every optimizer step (a callback after the EMA's)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def _take(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.hypernetwork.state_dict().items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps = [self._take(pl_module)]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.steps.append(self._take(pl_module))


def reference_average(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The EMA written out: start at the initial weights, then average = decay * average + (1 - decay) * weights."""
    average = {k: v.double() for k, v in steps[0].items()}
    for weights in steps[1:]:
        average = {k: decay * average[k] + (1 - decay) * weights[k].double() for k in average}
    return {k: v.float() for k, v in average.items()}


def file_weights(path: Path) -> dict[str, torch.Tensor]:
    return files.load_hypernetwork(path).state_dict()


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7, msg=key)


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


QUIET = ("callbacks.preview.steps=2", "train.learning_rate=1e-2")


def test_off_by_default_every_file_holds_the_last_weights(train_cfg, tmp_path):
    real = compose_config("train", ["model=sd15", "model.path=/m.safetensors", "data=folder", "data.path=/d"])
    assert real.callbacks.ema.enabled is False  # A1111 parity for real models; the embedded demo's recipe turns it on
    cfg = train_cfg(*QUIET, "callbacks.ema.enabled=false", "callbacks.export.save_every=2", "callbacks.preview.every=0",
                    steps=3)  # fmt: skip
    built = build_run(cfg)
    record = RecordWeights()
    built.trainer.callbacks.append(record)
    fit(built, cfg)
    assert EMA.find(built.trainer) is None
    out = tmp_path / "run" / "hypernetworks"
    assert_close(file_weights(out / "swish_121-2.pt"), record.steps[2])
    assert_close(file_weights(out / "swish_121.pt"), record.steps[3])


def test_enabled_every_output_holds_the_average_and_training_keeps_the_live_weights(train_cfg, tmp_path, monkeypatch):
    decay = 0.5
    cfg = train_cfg(
        *QUIET, "callbacks.ema.enabled=true", f"callbacks.ema.decay={decay}", "callbacks.ema.warmup=false",
        "callbacks.export.save_every=2", "callbacks.preview.every=2", "callbacks.validation.every=2", steps=4,
    )  # fmt: skip
    previewed = []  # the weights each preview grid was drawn with
    render = PreviewImages.render

    def spy(self, pl_module, prompts):
        previewed.append({k: v.detach().clone() for k, v in pl_module.hypernetwork.state_dict().items()})
        return render(self, pl_module, prompts)

    monkeypatch.setattr(PreviewImages, "render", spy)
    built = build_run(cfg)
    record = RecordWeights()
    built.trainer.callbacks.append(record)
    loss = fit(built, cfg)

    after_2, after_4 = reference_average(record.steps[:3], decay), reference_average(record.steps, decay)
    assert differ(after_4, record.steps[4])  # the average is not the last weights: the checks below can fail
    out = tmp_path / "run" / "hypernetworks"
    assert_close(file_weights(out / "swish_121-2.pt"), after_2)
    assert_close(file_weights(out / "swish_121-4.pt"), after_4)
    assert_close(file_weights(out / "swish_121.pt"), after_4)
    assert_close(files.load_hypernetwork(out / "swish_121.hyperlit.safetensors").state_dict(), after_4)
    # previews at steps 0, 2 and 4 (at_end does not repeat step 4); step 0 is the untrained network
    assert len(previewed) == 3
    assert_close(previewed[0], record.steps[0])
    assert_close(previewed[1], after_2) and assert_close(previewed[2], after_4)
    # val/loss (what sweeps minimise) scores the average: the same value as the average loaded by hand
    module, timesteps = built.module, cfg.callbacks.validation.timesteps
    live = {k: v.clone() for k, v in module.hypernetwork.state_dict().items()}
    assert_close(live, record.steps[4])  # swapped back after every use
    held = next(cb for cb in built.trainer.callbacks if isinstance(cb, ValidationLoss))._held_out(built.trainer)
    attach_hypernetworks(module.components.unet, [module.hypernetwork])  # the run detached it at its end
    module.hypernetwork.load_state_dict(after_4)
    assert loss == pytest.approx(validation_loss(module, held, timesteps), rel=1e-6)
    module.hypernetwork.load_state_dict(live)
    assert loss != pytest.approx(validation_loss(module, held, timesteps), rel=1e-6)
    detach_hypernetworks(module.components.unet)


@pytest.mark.parametrize("stop_at", [2, 3])
def test_a_resumed_run_writes_the_same_average_as_an_uninterrupted_one(train_cfg, tmp_path, stop_at):
    common = (*QUIET, "callbacks.ema.enabled=true", "callbacks.ema.decay=0.7", "callbacks.preview.every=0",
              "callbacks.preview.at_end=false", "callbacks.export.save_every=0",
              "callbacks.checkpoint.every_n_train_steps=1")  # fmt: skip
    straight = train_cfg(*common, f"paths.output_dir={tmp_path / 'a'}", steps=5)
    fit(build_run(straight), straight)

    first = train_cfg(*common, f"paths.output_dir={tmp_path / 'b'}", steps=stop_at)
    fit(build_run(first), first)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    second = train_cfg(*common, f"paths.output_dir={tmp_path / 'b'}", f"ckpt_path={last}", steps=5)
    fit(build_run(second), second)

    expected = file_weights(tmp_path / "a" / "hypernetworks" / "swish_121.pt")
    got = file_weights(tmp_path / "b" / "hypernetworks" / "swish_121.pt")
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
