"""Audit (issue 14, mutation survivors): the hypernetwork task's options, optimizer and training hooks, checked
through a short Lightning fit on the tiny model (fast: three steps on 8x8 latents)."""

from __future__ import annotations

import functools
import logging
import re
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import load_components
from hyperlit.tasks.hypernetwork.module import HypernetworkTask, min_snr_weights

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
        self.progress_bar: list[set] = []
        self.checkpointing: list[bool] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # noqa: ANN001
        grads = [p.grad.flatten() for p in module.hypernetwork.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        self.checkpointing.append(module.components.unet.is_gradient_checkpointing)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        # callbacks run before the module's own batch-end hook, so the previous step is read at the next start
        self.record(trainer, module)

    def record(self, trainer, module) -> None:  # noqa: ANN001
        self.steps.append(module.hypernetwork.step)
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.progress_bar.append(set(trainer.progress_bar_metrics))


def fit(components, monkeypatch, **options) -> Probe:
    """Three steps on the tiny model; the module's clock advances 0.5 s per call (samples/s is then exact)."""
    task_module = sys.modules[HypernetworkTask.__module__]

    ticks = iter(range(100))
    monkeypatch.setattr(task_module, "time", SimpleNamespace(perf_counter=lambda: 0.5 * next(ticks)))
    g = torch.Generator().manual_seed(0)
    batches = [
        {"latents": torch.randn(2, 4, 8, 8, generator=g), "context": torch.randn(2, 77, 48, generator=g)}
        for _ in range(3)
    ]
    task = HypernetworkTask(
        hn(), components, functools.partial(torch.optim.SGD), learning_rate="1e-2:2, 1e-3:10", max_steps=3,
        initial_step=100, **options,
    )  # fmt: skip
    probe = Probe()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(task, DataLoader(batches, batch_size=None))
    probe.record(trainer, task)  # after the last step
    probe.steps, probe.logged = probe.steps[1:], probe.logged[1:]  # before the first step nothing is logged yet
    probe.progress_bar = probe.progress_bar[1:]
    return probe


def test_three_steps_follow_the_schedule_log_the_gradient_norm_and_restore_the_unet(components, monkeypatch, caplog):
    before = dict(components.unet.attn_processors)
    with caplog.at_level(logging.INFO):
        probe = fit(components, monkeypatch)
    assert probe.steps == [101, 102, 103]  # A1111's step: the init_from file's steps + this run's
    # train/lr is the rate each step used: 1e-2 through step 2 ("1e-2:2"), then 1e-3
    assert [d["train/lr"] for d in probe.logged] == pytest.approx([1e-2, 1e-2, 1e-3])
    assert [d["train/grad_norm"] for d in probe.logged] == pytest.approx(probe.grad_norms, rel=1e-5)
    # 2 samples per 0.5 s of the module's clock, from the second step on (the first has no previous batch)
    assert "train/samples_per_s" not in probe.logged[0]
    assert [d["train/samples_per_s"] for d in probe.logged[1:]] == [4.0, 4.0]
    assert all(d["train/loss"] > 0 for d in probe.logged)
    # the progress bar shows loss, lr and samples/s, not the gradient norm
    assert probe.progress_bar[-1] == {"train/loss", "train/lr", "train/samples_per_s"}
    # defaults: no gradient checkpointing, no torch.compile (nor its timing message)
    assert probe.checkpointing == [False, False, False]
    assert not [r for r in caplog.records if "torch.compile" in r.getMessage()]
    # after fit the UNet has exactly its original attention processors back (attach at start, detach at end)
    after = components.unet.attn_processors
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)


def test_gradient_checkpointing_and_compile_options_reach_the_unet(components, monkeypatch, caplog):
    task_module = sys.modules[HypernetworkTask.__module__]

    compiled = []
    monkeypatch.setattr(task_module, "compile_unet", compiled.append)  # compiling itself is test_speed.py's job
    with caplog.at_level(logging.INFO):
        probe = fit(components, monkeypatch, gradient_checkpointing=True, compile=True)
    assert compiled == [components.unet]
    assert probe.checkpointing == [True, True, True]
    assert not components.unet.is_gradient_checkpointing  # switched off again at the end of fit
    messages = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(messages) == 1, messages
    assert re.fullmatch(
        r"torch\.compile: the first training step \(forward, backward, optimizer\) took \d+\.\d s "
        r"\(compilation included\)",
        messages[0],
    ), messages


# --- beyond the fit above: fast checks with stand-in components ---------------------------------------------


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records what it is called with and predicts the noisy input back."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):  # noqa: ANN001
        self.calls.append({"sample": sample, "timestep": timestep, "context": encoder_hidden_states, **kwargs})
        return SimpleNamespace(sample=sample)


class StandInComponents:
    """What the task reads from its components: condition(), unet, noise_scheduler, to(); calls recorded."""

    def __init__(self, unet: torch.nn.Module) -> None:
        from diffusers import DDPMScheduler

        self.unet = unet
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.prediction_type = "epsilon"
        self.moved_to: list = []
        self.conditioned: list[tuple] = []

    def to(self, device):  # noqa: ANN001
        self.moved_to.append(device)
        return self

    def condition(self, captions, sizes, text=None):  # noqa: ANN001
        from hyperlit.models.components import Conditioning

        self.conditioned.append((captions, sizes, text))
        added = {"added_cond_kwargs": {"time_ids": sizes}} if sizes is not None else {}
        return Conditioning(text.context, added)


def stand_in_task(unet: torch.nn.Module | None = None, **kw) -> HypernetworkTask:
    components = StandInComponents(unet if unet is not None else RecordingUNet())
    return HypernetworkTask(hn(), components, functools.partial(torch.optim.SGD), **kw)


def test_condition_passes_pooled_and_sizes_and_casts_to_the_unet_dtype():
    task = stand_in_task(RecordingUNet(dtype=torch.bfloat16))
    batch = {"context": torch.randn(2, 77, 48), "pooled": torch.randn(2, 8), "sizes": torch.tensor([[64.0] * 6] * 2)}
    cond = task.condition_for(batch)
    captions, sizes, text = task.components.conditioned[0]
    assert captions is None and sizes is batch["sizes"]
    assert text.context is batch["context"] and text.pooled is batch["pooled"]
    assert cond.context.dtype == torch.bfloat16 and cond.unet_kwargs["added_cond_kwargs"]["time_ids"].dtype == (
        torch.bfloat16
    )
    assert torch.equal(task.context_for(batch), batch["context"].to(torch.bfloat16))


def test_loss_at_accepts_a_bare_context_and_feeds_the_unet_its_dtype_and_kwargs():
    unet = RecordingUNet(dtype=torch.bfloat16)
    task = stand_in_task(unet)
    g = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    context, t = torch.randn(2, 77, 48, generator=g), torch.tensor([10, 900])
    from hyperlit.models.components import Conditioning

    bare = task.loss_at(latents, noise, t, context)
    wrapped = task.loss_at(latents, noise, t, Conditioning(context, {"added_cond_kwargs": {"x": torch.ones(2)}}))
    assert torch.equal(bare, wrapped)
    first, second = unet.calls
    assert first["sample"].dtype == first["context"].dtype == torch.bfloat16
    assert torch.equal(first["context"], context.to(torch.bfloat16))
    assert "added_cond_kwargs" not in first and second["added_cond_kwargs"]["x"].dtype == torch.bfloat16
    # the stand-in predicts the noisy latent back: the loss is its MSE to the noise, computed in fp32
    scheduler = task.components.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, t).to(torch.bfloat16).float()
    torch.testing.assert_close(bare, ((noisy - noise) ** 2).mean(dim=(1, 2, 3)))


def test_every_tensor_of_the_loss_is_made_on_the_latents_device():
    # the "meta" device stands in for a GPU: a tensor made on the default device (CPU) cannot mix with it
    unet = RecordingUNet()
    task = stand_in_task(unet, noise_offset=0.1, min_snr_gamma=5.0)
    task.to("meta")
    batch = {"latents": torch.zeros(2, 4, 8, 8, device="meta"), "context": torch.zeros(2, 77, 48)}
    loss = task.compute_loss(batch)
    assert loss.device.type == "meta" and loss.shape == (2,)
    call = unet.calls[0]
    assert {call["sample"].device.type, call["timestep"].device.type, call["context"].device.type} == {"meta"}
    weights = min_snr_weights(torch.linspace(0.99, 0.01, 1000), torch.tensor([1, 500], device="meta"), 5.0, "epsilon")
    assert weights.device.type == "meta"
    # each entry point moves the conditioning itself (condition_for to the module's device, loss_at to the latents')
    assert task.condition_for(batch).context.device.type == "meta"
    latents = batch["latents"]
    task.loss_at(latents, torch.zeros_like(latents), torch.tensor([3, 4], device="meta"), torch.zeros(2, 77, 48))
    assert unet.calls[-1]["context"].device.type == "meta"


def test_training_step_logs_loss_and_samples_per_second_over_all_ranks(monkeypatch):
    task = stand_in_task()
    ticks = iter([10.0, 10.25])
    clock = SimpleNamespace(perf_counter=lambda: next(ticks))
    monkeypatch.setattr(sys.modules[HypernetworkTask.__module__], "time", clock)
    logged: list[tuple] = []
    monkeypatch.setattr(task, "log", lambda name, value, **kw: logged.append((name, float(value), kw)))
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.25}])
    task._trainer = SimpleNamespace(world_size=3, optimizers=[optimizer])  # what training_step reads of the trainer
    batch = {"latents": torch.randn(2, 4, 8, 8), "context": torch.randn(2, 77, 48)}
    first = task.training_step(batch, 0)
    task.training_step(batch, 1)
    assert first.dim() == 0 and logged[0][0] == "train/loss" and logged[0][1] == pytest.approx(float(first))
    assert [(name, kw) for name, _, kw in logged] == [
        ("train/loss", {"prog_bar": True, "batch_size": 2}),
        ("train/lr", {"prog_bar": True, "batch_size": 2}),
        ("train/loss", {"prog_bar": True, "batch_size": 2}),
        ("train/samples_per_s", {"prog_bar": True, "batch_size": 2}),
        ("train/lr", {"prog_bar": True, "batch_size": 2}),
    ]
    assert logged[3][1] == 2 * 3 / 0.25  # samples of every rank per second of this rank's clock
    assert logged[1][1] == logged[4][1] == 0.25  # the rate in the optimizer when the step's loss is computed


def test_fit_start_moves_the_components_to_the_module_device():
    from helpers.attention_models import make_unet

    task = stand_in_task(make_unet())
    task.on_fit_start()
    try:
        assert task.components.moved_to == [task.device]
    finally:
        task.on_fit_end()


@pytest.mark.parametrize(("rank", "warned"), [(0, True), (1, False)])
def test_compile_on_the_cpu_is_compiled_on_every_rank_and_said_by_global_rank_zero_only(monkeypatch, rank, warned):
    from helpers.attention_models import make_unet

    module = sys.modules[HypernetworkTask.__module__]
    compiled, said = [], []
    monkeypatch.setattr(module, "compile_unet", compiled.append)
    monkeypatch.setattr(module, "warn_compile_on_cpu", said.append)
    task = stand_in_task(make_unet(), compile=True)
    task._trainer = SimpleNamespace(global_rank=rank)  # all on_fit_start reads of the trainer
    task.on_fit_start()
    try:
        assert compiled == [task.components.unet]
        assert said == ([task.device] if warned else [])
    finally:
        task.on_fit_end()
