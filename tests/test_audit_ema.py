"""Audit (issue 14): EMA start_step boundary, update_every, and that validation and exports see the averaged
weights and give the live ones back afterwards, also when an exception happens inside."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperlit.callbacks.ema import EMA


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.ema_should_update = True  # every batch end counts as a real optimizer update


class Trainer:
    global_step = 0
    callbacks: list = []


def step_to(ema: EMA, m: Net, value: float) -> torch.Tensor:
    """Set the live weight to ``value`` (an optimizer update) and run the EMA batch-end hook."""
    with torch.no_grad():
        m.a.weight.fill_(value)
    ema.on_train_batch_end(Trainer(), m, None, None, 0)
    return torch.full_like(m.a.weight, value)


def test_start_step_boundary_tracks_raw_weights_through_start_step_then_averages():
    m = Net()
    ema = EMA(decay=0.5, warmup=False, start_step=2)
    ema.on_fit_start(Trainer(), m)
    step_to(ema, m, 1.0)
    w2 = step_to(ema, m, 2.0)
    # updates 1 and 2 are "before start": the shadow is the raw weight, no average yet
    assert torch.equal(ema.shadow["a.weight"], w2) and ema.num_updates == 0
    w3 = step_to(ema, m, 3.0)
    # update 3 is the first average: 0.5 * w2 + 0.5 * w3, computed by hand
    assert torch.equal(ema.shadow["a.weight"], 0.5 * w2 + 0.5 * w3) and ema.num_updates == 1


def test_start_step_zero_averages_from_the_first_update():
    m = Net()
    w0 = m.a.weight.detach().clone()
    ema = EMA(decay=0.5, warmup=False, start_step=0)
    ema.on_fit_start(Trainer(), m)
    w1 = step_to(ema, m, 4.0)
    assert torch.allclose(ema.shadow["a.weight"], 0.5 * w0 + 0.5 * w1) and ema.num_updates == 1


def test_update_every_averages_only_every_nth_update():
    m = Net()
    ema = EMA(decay=0.5, warmup=False, update_every=2)
    ema.on_fit_start(Trainer(), m)
    s0 = ema.shadow["a.weight"].clone()
    step_to(ema, m, 1.0)
    assert torch.equal(ema.shadow["a.weight"], s0) and ema.num_updates == 0
    w2 = step_to(ema, m, 2.0)
    assert torch.allclose(ema.shadow["a.weight"], 0.5 * s0 + 0.5 * w2) and ema.num_updates == 1


def test_global_step_decides_when_the_module_has_no_flag():
    m = nn.Linear(2, 2)  # no ema_should_update: an increase of trainer.global_step is the signal
    ema = EMA(decay=0.5, warmup=False)
    t = Trainer()
    ema.on_fit_start(t, m)
    ema.on_train_batch_end(t, m, None, None, 0)  # global_step unchanged: no update
    assert ema.num_updates == 0
    t.global_step = 1
    ema.on_train_batch_end(t, m, None, None, 1)
    assert ema.num_updates == 1 and ema.seen_updates == 1


# ------------------------------------------------------------------------- validation through Lightning


class Regressor(pl.LightningModule):
    """y = 2x by SGD with a large rate, so live and averaged weights differ after two steps."""

    def __init__(self, fail_in_validation: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        self.fail_in_validation = fail_in_validation
        self.seen_in_validation: list[torch.Tensor] = []
        self.live_before_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        return ((self.lin(x) - y) ** 2).mean()

    def on_validation_start(self) -> None:
        # callbacks' hooks run before the module's: record what the EMA swapped in and what validation sees
        self.seen_in_validation.append(self.lin.weight.detach().clone())

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        if self.fail_in_validation:
            raise RuntimeError("boom in validation")
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


class LiveProbe(pl.Callback):
    """Runs before the EMA callback in the list: the weights it sees at validation start are the live ones."""

    def __init__(self) -> None:
        self.live: list[torch.Tensor] = []

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.live.append(pl_module.lin.weight.detach().clone())


def _loader() -> DataLoader:
    x = torch.linspace(-1, 1, 4).unsqueeze(1)
    return DataLoader(TensorDataset(x, 2 * x), batch_size=2)


def _trainer(callbacks: list, max_steps: int = 2) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=2,
        callbacks=callbacks,
    )


def test_validation_sees_ema_weights_and_live_weights_return(tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    probe, ema = LiveProbe(), EMA(decay=0.5, warmup=False)
    _trainer([probe, ema]).fit(module, _loader(), _loader())
    (live,), (seen,) = probe.live, module.seen_in_validation
    assert not torch.equal(live, ema.shadow["lin.weight"])  # the test can tell the two apart
    assert torch.equal(seen, ema.shadow["lin.weight"])  # validation ran on the averaged weights
    assert torch.equal(module.lin.weight.detach(), live)  # and the live weights came back afterwards


def test_validate_with_ema_false_validates_the_live_weights(tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    probe, ema = LiveProbe(), EMA(decay=0.5, warmup=False, validate_with_ema=False)
    _trainer([probe, ema]).fit(module, _loader(), _loader())
    assert torch.equal(module.seen_in_validation[0], probe.live[0])


def test_an_exception_in_validation_leaves_the_live_weights_in_the_model(tmp_path):
    torch.manual_seed(0)
    module = Regressor(fail_in_validation=True)
    probe, ema = LiveProbe(), EMA(decay=0.5, warmup=False)
    with pytest.raises(RuntimeError, match="boom in validation"):
        _trainer([probe, ema]).fit(module, _loader(), _loader())
    assert torch.equal(module.seen_in_validation[0], ema.shadow["lin.weight"])
    assert not torch.equal(probe.live[0], ema.shadow["lin.weight"])
    assert torch.equal(module.lin.weight.detach(), probe.live[0])  # on_exception swapped the live weights back
    assert ema._backup is None  # a later swap would work again


# ------------------------------------------------------------------------- exports


class Owner(nn.Module):
    """What VAEExport needs from the task: ``.vae`` and the EMA-tracked parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.vae = nn.Linear(2, 2)


class ExportTrainer:
    is_global_zero = True

    def __init__(self, ema: EMA) -> None:
        self.callbacks = [ema]


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "write-fails"])
def test_export_writes_ema_weights_and_restores_live_ones(tmp_path, monkeypatch, fail):
    from hyperlit.callbacks.vae_export import VAEExport

    owner = Owner()
    ema = EMA(decay=0.5, warmup=False)
    ema.on_fit_start(Trainer(), owner)
    with torch.no_grad():
        owner.vae.weight.add_(10.0)  # live weights move away from the shadow
    live = owner.vae.weight.detach().clone()
    written: list[torch.Tensor] = []

    def write(vae: nn.Module, stem: str) -> list:
        written.append(vae.weight.detach().clone())
        if fail:
            raise OSError("disk full")
        return []

    export = VAEExport(str(tmp_path), save_discriminator=False)
    monkeypatch.setattr(export, "_write", write)
    if fail:
        with pytest.raises(OSError, match="disk full"):
            export.export(ExportTrainer(ema), owner, "x")
    else:
        export.export(ExportTrainer(ema), owner, "x")
    assert torch.equal(written[0], ema.shadow["vae.weight"]) and not torch.equal(written[0], live)
    assert torch.equal(owner.vae.weight.detach(), live)


# ------------------------------------------------------------------------- found by mutation testing


def test_defaults_and_warmup_formula():
    ema = EMA()
    assert (ema.decay, ema.warmup, ema.start_step, ema.update_every, ema.validate_with_ema) == (
        0.9999, True, 0, 1, True
    )  # fmt: skip
    assert ema.shadow == {} and ema.state_dict()["shadow"] == {}
    for n, expected in [(0, 1 / 10), (5, 6 / 15), (20, 21 / 30)]:  # (1 + n) / (10 + n), LitEma's warm-up
        ema.num_updates = n
        assert ema.current_decay() == pytest.approx(expected)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.9999  # capped by the configured decay


def test_decay_zero_is_allowed_and_copies_the_live_weights():
    m = Net()
    ema = EMA(decay=0.0, warmup=False)
    ema.on_fit_start(Trainer(), m)
    w = step_to(ema, m, 5.0)
    assert torch.equal(ema.shadow["a.weight"], w)
    with pytest.raises(ValueError, match=r"^ema.update_every=0 must be >= 1$"):
        EMA(update_every=0)


def test_find_returns_none_without_an_ema_callback():
    assert EMA.find(Trainer()) is None
    ema = EMA()
    t = Trainer()
    t.callbacks = [object(), ema]
    assert EMA.find(t) is ema


def test_ema_parameters_choose_what_is_averaged():
    class Chooser(Net):
        def ema_parameters(self):
            yield "a.weight", self.a.weight  # the bias is trainable but not averaged

    ema = EMA()
    ema.on_fit_start(Trainer(), Chooser())
    assert set(ema.shadow) == {"a.weight"}


def test_resumed_shadow_must_match_and_moves_to_the_weights_device_and_fp32():
    m = nn.Linear(2, 2, device="meta")  # a device other than the checkpoint's cpu, without a GPU
    ema = EMA()
    ema.load_state_dict({"shadow": {"weight": torch.zeros(2, 2, dtype=torch.float64), "bias": torch.zeros(2)},
                         "num_updates": 3})  # fmt: skip
    ema.on_fit_start(Trainer(), m)
    assert ema.shadow["weight"].device.type == "meta" and ema.shadow["weight"].dtype == torch.float32
    assert ema.seen_updates == 3  # an old state without seen_updates counts its updates as seen
    wrong = EMA()
    wrong.load_state_dict({"shadow": {"x": torch.zeros(1)}, "num_updates": 0, "seen_updates": 0})
    with pytest.raises(ValueError) as err:
        wrong.on_fit_start(Trainer(), nn.Linear(2, 2))
    assert str(err.value) == "EMA state does not match the model's trainable weights (e.g. bias)"


def test_state_dict_round_trip_keeps_every_counter():
    m = Net()
    ema = EMA(decay=0.5, warmup=False, start_step=1)
    ema.on_fit_start(Trainer(), m)
    step_to(ema, m, 1.0)
    step_to(ema, m, 2.0)
    state = ema.state_dict()
    assert set(state) == {"shadow", "num_updates", "seen_updates", "decay"} and state["decay"] == 0.5
    other = EMA()
    other.load_state_dict(state)
    assert (other.num_updates, other.seen_updates) == (1, 2)


def test_swap_out_twice_is_harmless():
    m = Net()
    ema = EMA(decay=0.5, warmup=False)
    ema.on_fit_start(Trainer(), m)
    ema.on_validation_start(Trainer(), m)
    ema.on_validation_end(Trainer(), m)
    ema.on_exception(Trainer(), m, RuntimeError("later, in training"))  # nothing swapped in: nothing to do
    assert ema._backup is None
