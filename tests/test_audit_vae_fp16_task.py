"""The VAE task's fp16_fix path, fast (issue 31): the closed form run by the task (``fp16_closed_form``), the
fine-tuning scope (``limit_fp16_fine_tuning``) and one fp16_fix training step, each against the same thing done by
hand on a copy of the decoder (``rescale_decoder``, an optimizer over the log gains, the fold), with a stand-in
trainer instead of a fit (the slow fits of ``test_vae_fp16_rescale.py`` run the same path end to end)."""

from __future__ import annotations

import copy
import functools
import importlib
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hyperlit.models.tiny import build_tiny
from hyperlit.tasks.vae.module import VAEDecoderTask
from hyperlit.vae.config import Fp16FixConfig, LossConfig, PerceptualConfig, PosteriorConfig, VAETaskConfig
from hyperlit.vae.fp16 import FP16_MAX, HEADROOM
from hyperlit.vae.fp16_fix import LayerGains, scale_layer
from hyperlit.vae.fp16_rescale import fine_tune_scope, rescale_decoder

EDGE = FP16_MAX / HEADROOM
SCOPE = ["post_quant_conv", "decoder.conv_in"]  # post_quant_conv left over the target, and its reader


def pixels(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def means(vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The posterior mode, straight from diffusers (the oracle of the task's cached posterior)."""
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean


def peak(vae: torch.nn.Module, name: str, z: torch.Tensor) -> float:
    seen: list[float] = []
    handle = dict(vae.named_modules())[name].register_forward_hook(lambda m, i, o: seen.append(float(o.abs().max())))
    with torch.no_grad():
        vae.decode(z)
    handle.remove()
    return max(seen)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return build_tiny(0)[1].eval()


def unsafe_vae(base: torch.nn.Module, left: bool) -> torch.nn.Module:
    """A resnet conv1 scaled far over the fp16 range (the closed form fixes it); with ``left``, post_quant_conv too
    (with its reader compensating), which no normalisation reads: left to fine-tuning."""
    vae = copy.deepcopy(base)
    z = means(base, pixels(4))
    layer = "decoder.up_blocks.1.resnets.0.conv1"
    scale_layer(vae, layer, 1e4 * EDGE / peak(base, layer, z))
    if left:
        scale_layer(vae, "post_quant_conv", 1e2 * EDGE / peak(base, "post_quant_conv", z), "decoder.conv_in")
    return vae


def task_of(vae: torch.nn.Module, max_steps: int = 4, **fp16) -> VAEDecoderTask:
    cfg = VAETaskConfig(
        max_steps=max_steps,
        loss=LossConfig(perceptual=PerceptualConfig(weight=0.0), kind="fp16_fix", fp16_fix=Fp16FixConfig(**fp16)),
        posterior=PosteriorConfig(cache=False, sample=False),
    )
    return VAEDecoderTask(vae, cfg, None)


class Ranks:
    """``strategy.all_gather`` of two ranks: the other rank saw ``other`` times this rank's values."""

    def __init__(self, other: float) -> None:
        self.other = other
        self.calls = 0

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.stack([t, t * self.other])


def stand_in_trainer(images: torch.Tensor, batch_size: int = 2, other: float = 1.0, zero: bool = True):
    batches = [
        {"pixels": images[i : i + batch_size], "index": torch.arange(i, min(i + batch_size, len(images)))}
        for i in range(0, len(images), batch_size)
    ]
    dm = SimpleNamespace(train_dataloader=lambda: iter(batches))
    return SimpleNamespace(datamodule=dm, strategy=Ranks(other), is_global_zero=zero, should_stop=False)


def state(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


# ------------------------------------------------------------------------------------------------ closed form


@pytest.mark.parametrize("left", [False, True], ids=["nothing-left", "post_quant_conv-left"])
def test_the_closed_form_rescales_as_rescale_decoder_does_on_the_first_training_images(base, left, caplog):
    unsafe = unsafe_vae(base, left)
    images = pixels(5, seed=3)
    task = task_of(copy.deepcopy(unsafe), measure_images=3, target=4000.0)
    trainer = stand_in_trainer(images, other=2.0)
    with caplog.at_level(logging.INFO, logger="hyperlit.tasks.vae.module"):
        report = task.fp16_closed_form(trainer)

    # the oracle: the first 3 images' posterior modes (batches of 2: 2 + 1), every peak doubled by the other rank
    oracle = copy.deepcopy(unsafe)
    latents = [means(unsafe, images[:2]), means(unsafe, images[2:3])]
    want = rescale_decoder(oracle, latents, 4000.0, lambda t: t * 2.0)
    assert report == want == task.fp16_report and want.images == 3 and want.changes
    got = state(task.vae)
    assert all(torch.equal(got[k], v) for k, v in oracle.state_dict().items())
    scope = fine_tune_scope(oracle, [p.layer for p in want.left]) if want.left else []
    assert scope == (SCOPE if left else [])
    assert task.fp16_scope == scope and task.fp16_rescaled and trainer.strategy.calls > 0
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if m.startswith("fp16 closed form: ")] == [f"fp16 closed form: {x}" for x in want.lines()]
    assert lines[-1] == "fp16 fine-tuning: " + (", ".join(SCOPE) if left else "none")
    gains_kept = {id(p) for p in task.gains.parameters()} - {id(p) for p in task._no_update}
    assert gains_kept == {id(task.gains.log_gains[n.replace(".", "__")]) for n in scope}


def test_the_closed_form_runs_once_is_silent_off_rank_zero_and_needs_training_images(base, caplog):
    unsafe = unsafe_vae(base, left=True)
    task = task_of(copy.deepcopy(unsafe), measure_images=2)
    with caplog.at_level(logging.INFO, logger="hyperlit.tasks.vae.module"):
        first = task.fp16_closed_form(stand_in_trainer(pixels(2), zero=False))
    assert first is not None and first.changes and caplog.records == []  # only rank 0 logs
    after = state(task.vae)
    task._no_update = []
    assert task.fp16_closed_form(stand_in_trainer(pixels(2, seed=9))) is first  # no second rescale
    assert all(torch.equal(after[k], v) for k, v in state(task.vae).items())
    assert task.fp16_scope == SCOPE and len(task._no_update) == len(task.gains.log_gains) - 2  # scope applied again

    resumed = task_of(copy.deepcopy(task.vae), measure_images=2)  # a resumed run: the weights hold the factors
    resumed.on_load_checkpoint({"vae_task": {"fp16_rescaled": True, "fp16_scope": ["post_quant_conv"]}})
    before = state(resumed.vae)
    assert resumed.fp16_closed_form(stand_in_trainer(pixels(2))) is None
    assert all(torch.equal(before[k], v) for k, v in state(resumed.vae).items())
    assert resumed.fp16_scope == ["post_quant_conv"] and len(resumed._no_update) == len(resumed.gains.log_gains) - 1

    empty = task_of(copy.deepcopy(unsafe))
    with pytest.raises(ValueError, match=r"^loss.fp16_fix.closed_form: no training images to measure"):
        empty.fp16_closed_form(stand_in_trainer(pixels(0)))
    no_data = task_of(copy.deepcopy(unsafe))
    with pytest.raises(ValueError, match="no training images"):
        no_data.fp16_closed_form(SimpleNamespace(datamodule=None, strategy=Ranks(1.0), is_global_zero=True))


def test_a_layer_left_whose_readers_are_unknown_opens_every_layer_to_fine_tuning(base, monkeypatch, caplog):
    # fine_tune_scope answers None when a left layer has no known readers (none of the tiny decoder's does)
    module = importlib.import_module("hyperlit.tasks.vae.module")
    seen = []
    monkeypatch.setattr(module, "fine_tune_scope", lambda vae, left: seen.append(list(left)))
    task = task_of(copy.deepcopy(unsafe_vae(base, left=True)), measure_images=2)
    with caplog.at_level(logging.INFO, logger="hyperlit.tasks.vae.module"):
        task.fp16_closed_form(stand_in_trainer(pixels(2)))
    assert seen == [["post_quant_conv"]] and task.fp16_scope is None and task._no_update == []
    assert caplog.messages[-1] == "fp16 fine-tuning: every layer"


def test_no_closed_form_without_fp16_fix_or_with_closed_form_off(base):
    unsafe = unsafe_vae(base, left=False)
    off = task_of(copy.deepcopy(unsafe), closed_form=False)
    plain = VAEDecoderTask(
        copy.deepcopy(unsafe), VAETaskConfig(loss=LossConfig(perceptual=PerceptualConfig(weight=0.0))), None
    )
    for task in (off, plain):
        assert task.fp16_closed_form(stand_in_trainer(pixels(2))) is None
        assert not task.fp16_rescaled and task.fp16_scope is None and task._no_update == []
        assert all(torch.equal(unsafe.state_dict()[k], v) for k, v in state(task.vae).items())


# ------------------------------------------------------------------------------------------------ scope


@pytest.mark.parametrize("train_weights", [False, True])
def test_the_scope_leaves_every_other_gain_and_weight_out_of_the_update(base, train_weights):
    task = task_of(copy.deepcopy(base), train_weights=train_weights)
    task.limit_fp16_fine_tuning(None)
    assert task.fp16_scope is None and task._no_update == []
    task.limit_fp16_fine_tuning(list(SCOPE))
    assert task.fp16_scope == SCOPE
    # the oracle by parameter names: every gain but the scope's; with train_weights, every decoder and
    # post_quant_conv parameter outside the two layers too (the norms' affine parameters included)
    want = {id(p) for n, p in task.gains.log_gains.items() if n not in ("post_quant_conv", "decoder__conv_in")}
    if train_weights:
        want |= {
            id(p)
            for n, p in task.vae.named_parameters()
            if n.startswith(("decoder.", "post_quant_conv."))
            and not n.startswith(("decoder.conv_in.", "post_quant_conv."))
        }
    assert {id(p) for p in task._no_update} == want and len(task._no_update) == len(want)
    assert any("norm" in n for n, p in task.vae.named_parameters() if id(p) in want) == train_weights
    task.limit_fp16_fine_tuning([])
    assert len(task._no_update) == len(task.gains.log_gains) + (
        sum(1 for n, _ in task.vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))
        if train_weights
        else 0
    )


# ------------------------------------------------------------------------------------------------ training step


def attach(task: VAEDecoderTask):
    """What training_step reads of a Trainer; the optimizer is the task's own."""
    (opt,) = task.configure_optimizers()
    trainer = SimpleNamespace(should_stop=False, logged={}, kwargs={})

    def log(key, value, **kwargs) -> None:
        trainer.logged[key] = float(value)
        trainer.kwargs[key] = kwargs

    task._trainer = trainer
    task.optimizers = lambda: opt
    task.manual_backward = lambda loss: loss.backward()
    task.log_dict = lambda d, **kw: [log(k, v, **kw) for k, v in d.items()]
    task.log = log
    return trainer, opt


def hand_steps(vae, batches, scope, penalty_weight, target, lr):
    """The fp16_fix steps written out: the starting decoder's output as the teacher, the gains applied by hand
    as their layers' weight and bias scales, the relative teacher MSE plus the weighted mean of
    relu(log(peak / target))^2 over every layer's, resnet's and attention's per-sample peaks, Adam on the gains
    in scope only, then the gains multiplied into the weights."""
    teacher = copy.deepcopy(vae).requires_grad_(False)
    vae = copy.deepcopy(vae).requires_grad_(False)
    gains = LayerGains(vae)
    names = [n for n in gains.log_gains if scope is None or n.replace("__", ".") in scope]
    opt = torch.optim.Adam([gains.log_gains[n] for n in names], lr=lr)
    layers = dict(vae.named_modules())
    watched = {n.replace("__", "."): layers[n.replace("__", ".")] for n in gains.log_gains}
    watched |= {
        f"decoder.{n}": m for n, m in vae.decoder.named_modules() if type(m).__name__ in ("ResnetBlock2D", "Attention")
    }
    logs = []
    for x in batches:
        z = means(vae, x)
        with torch.no_grad():
            want = teacher.decode(z).sample
        saved = {
            n: (m.weight.detach().clone(), m.bias)
            for n, m in watched.items()
            if n.replace(".", "__") in gains.log_gains
        }
        peaks: list[torch.Tensor] = []
        record = functools.partial(lambda seen, m, i, o: seen.append(o.abs().flatten(1).amax(1)), peaks)
        handles = [m.register_forward_hook(record) for m in watched.values()]
        for n, (w, b) in saved.items():
            g = gains.log_gains[n.replace(".", "__")]
            del layers[n].weight
            layers[n].weight = w * g[0].exp()
            if b is not None:
                del layers[n].bias
                layers[n].bias = b.detach() * g[1].exp()
        out = vae.decode(z).sample
        for n, (w, b) in saved.items():
            del layers[n].weight
            layers[n].weight = torch.nn.Parameter(w, requires_grad=False)
            if b is not None:
                del layers[n].bias
                layers[n].bias = b
        for h in handles:
            h.remove()
        rec = F.mse_loss(out, want) / want.var()
        pen = sum(F.relu(torch.log(p / target)).pow(2).mean() for p in peaks) / len(peaks)
        loss = rec + penalty_weight * pen
        opt.zero_grad()
        loss.backward()
        opt.step()
        gains.fold()
        logs.append(
            {
                "loss": float(loss.detach()),
                "rec": float(rec.detach()),
                "pen": float(pen.detach()),
                "peak": max(float(p.detach().max()) for p in peaks),
            }
        )
    return vae, logs


@pytest.mark.parametrize("scope", [None, SCOPE], ids=["every-layer", "scope"])
def test_fp16_fix_steps_match_the_steps_written_out(base, scope):
    vae = unsafe_vae(base, left=True)
    batches = [pixels(2, seed=1), pixels(2, seed=2)]
    task = task_of(copy.deepcopy(vae), max_steps=2, penalty_weight=0.5, target=300.0, gain_lr=0.05)
    trainer, opt = attach(task)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 0.05] and opt.param_groups[1]["betas"] == (0.9, 0.999)
    task.limit_fp16_fine_tuning(scope)
    task.bad_in_a_row = 2
    want_vae, want_logs = hand_steps(vae, batches, scope, 0.5, 300.0, 0.05)
    assert all(log["pen"] > 0 for log in want_logs)  # the penalty is active: its weight and target matter
    for i, x in enumerate(batches):
        task.training_step({"pixels": x, "index": torch.arange(2)}, i)
        assert (task.step, task.bad_in_a_row, task.ema_should_update) == (i + 1, 0, True)
        assert trainer.should_stop == (i == 1)  # the last step stops the run
        assert trainer.logged["train/total"] == pytest.approx(want_logs[i]["loss"], rel=1e-4)
        assert trainer.logged["train/teacher_mse"] == pytest.approx(want_logs[i]["rec"], rel=1e-4, abs=1e-9)
        assert trainer.logged["train/activation_penalty"] == pytest.approx(want_logs[i]["pen"], rel=1e-4)
        assert trainer.logged["train/peak"] == pytest.approx(want_logs[i]["peak"], rel=1e-5)
        assert trainer.logged["train/step"] == i + 1
        assert trainer.kwargs == {k: {"on_step": True, "batch_size": 2} for k in trainer.logged}
    assert all(float(g.abs().max()) == 0.0 for g in task.gains.parameters())  # folded after each step
    got, want = state(task.vae), state(want_vae)
    changed = set()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=k)
        if not torch.equal(v, vae.state_dict()[k]):
            changed.add(k.rsplit(".", 1)[0])
    assert changed == {"post_quant_conv", "decoder.conv_in"} if scope else len(changed) > 2
    assert all(not m._forward_hooks for m in task.vae.modules())  # the monitor's hooks are removed


def test_a_non_finite_fp16_fix_loss_skips_the_update_and_an_empty_scope_stops(base, caplog):
    task = task_of(unsafe_vae(base, left=True), max_steps=5)
    trainer, _ = attach(task)
    before = state(task.vae)
    bad = pixels(2)
    bad[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="hyperlit.tasks.vae.module"):
        task.training_step({"pixels": bad}, 0)
    assert (task.step, task.skipped_steps, task.bad_in_a_row, task.ema_should_update) == (0, 1, 1, False)
    assert [r.getMessage() for r in caplog.records if r.name == "hyperlit.tasks.vae.module"] == [
        "step 0: the fp16_fix loss is nan; update skipped (1 in a row)"
    ]
    assert all(torch.equal(before[k], v) for k, v in state(task.vae).items()) and trainer.logged == {}
    assert all(not m._forward_hooks for m in task.vae.modules())

    task.fp16_scope = []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hyperlit.tasks.vae.module"):
        task.training_step({"pixels": pixels(2)}, 1)
    assert trainer.should_stop and (task.step, task.skipped_steps, task.ema_should_update) == (0, 1, False)
    assert [r.getMessage() for r in caplog.records if r.name == "hyperlit.tasks.vae.module"] == [
        "fp16_fix: the closed form left no layer over the target; nothing to fine-tune, stopping"
    ]
    assert all(torch.equal(before[k], v) for k, v in state(task.vae).items())


def test_fp16_fix_steps_decode_a_sample_of_the_posterior(base):
    task = task_of(copy.deepcopy(base))
    task.config.posterior.sample = True
    attach(task)
    seen = []
    task.fp16_fix_step = lambda opt, z, bs: seen.append((z, bs))
    x = pixels(2, seed=8)
    torch.manual_seed(5)
    task.training_step({"pixels": x}, 0)
    with torch.no_grad():
        dist = base.encode(x).latent_dist
    torch.manual_seed(5)
    eps = torch.randn_like(dist.mean)
    ((z, bs),) = seen
    assert bs == 2
    torch.testing.assert_close(z, dist.mean + torch.exp(0.5 * dist.logvar) * eps, rtol=1e-5, atol=1e-6)
