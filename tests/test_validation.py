"""val/loss: the diffusion loss of held-out images at fixed (timestep, noise) pairs depends on the weights only."""

from __future__ import annotations

import csv
import logging
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.config import compose_config

from hyperlit import files
from hyperlit.attention import attach_hypernetworks
from hyperlit.callbacks.validation import fixed_noise, fixed_timesteps, validation_loss
from hyperlit.data.heldout import HeldOut
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import FAMILIES, load_components
from hyperlit.runner import build_run, fit, run
from hyperlit.tasks.hypernetwork.build import hypernetwork_config
from hyperlit.tasks.hypernetwork.module import HypernetworkTask

TINY_WIDTHS = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]


def task_with(hn: Hypernetwork, components) -> HypernetworkTask:
    module = HypernetworkTask(hypernetwork=hn, components=components, optimizer=partial(torch.optim.AdamW))
    attach_hypernetworks(components.unet, [hn])
    return module


def random_network(seed: int, scale: float = 0.1) -> Hypernetwork:
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1], dropout_structure=[0, 0.3, 0]), sizes=TINY_WIDTHS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return hn


@pytest.fixture(scope="module")
def tiny():
    return load_components(family="tiny")


@pytest.fixture(scope="module")
def held_out():
    generator = torch.Generator().manual_seed(5)
    return [
        HeldOut(f"key{i}", torch.randn(4, 8, 8, generator=generator), f"caption {i}", f"a photo of caption {i}")
        for i in range(2)
    ]


def test_timesteps_spread_over_the_schedule_and_noise_is_fixed_per_key() -> None:
    assert fixed_timesteps(1000, 4).tolist() == [125, 375, 625, 875]
    assert fixed_timesteps(1000, 8).tolist()[0] == 62 and fixed_timesteps(1000, 8).tolist()[-1] == 937
    torch.manual_seed(1)
    a = fixed_noise("k", 3, (4, 8, 8))
    torch.manual_seed(2)
    assert torch.equal(a, fixed_noise("k", 3, (4, 8, 8)))
    assert not torch.equal(a, fixed_noise("other", 3, (4, 8, 8)))


def test_same_weights_same_value_whatever_the_rng_mode_or_multiplier(tiny, held_out) -> None:
    module = task_with(random_network(0), tiny)
    torch.manual_seed(1)
    first = validation_loss(module, held_out, timesteps=4)
    torch.manual_seed(2)
    module.hypernetwork.train()  # dropout would make it random: scored in eval mode
    module.hypernetwork.multiplier = 0.3  # scored at the training strength, 1
    second = validation_loss(module, held_out, timesteps=4)
    assert first == second
    assert module.hypernetwork.training and module.hypernetwork.multiplier == 0.3  # restored
    other = task_with(random_network(1), tiny)
    assert validation_loss(other, held_out, timesteps=4) != first


def test_value_matches_a_per_timestep_reference(tiny, held_out) -> None:
    module = task_with(random_network(0), tiny)
    value = validation_loss(module, held_out, timesteps=4)
    scheduler = tiny.noise_scheduler
    module.hypernetwork.eval()
    errors = []
    with torch.no_grad():
        for item in held_out:
            noise = fixed_noise(item.key, 4, item.latents.shape)
            context = tiny.encode_text([item.prompt])
            for i, t in enumerate(fixed_timesteps(1000, 4)):
                ts = t.reshape(1)
                noisy = scheduler.add_noise(item.latents[None], noise[i : i + 1], ts)
                prediction = tiny.unet(noisy, ts, context).sample
                errors.append(F.mse_loss(prediction, noise[i : i + 1]).item())
    assert value == pytest.approx(sum(errors) / len(errors), rel=1e-5)


def read_metric(run_dir: Path, name: str = "val/loss") -> dict[int, str]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): row[name] for row in csv.DictReader(f) if row.get(name)}


def train_overrides(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"paths.output_dir={out}", "logger=csv", f"data.cache_dir={tmp_path / 'cache'}", "~callbacks.progress",
        "trainer.enable_progress_bar=false", "callbacks.preview.every=0", "callbacks.preview.at_end=false",
        "callbacks.validation.every=2", "callbacks.export.save_every=0", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_val_loss_same_under_other_seeds_and_after_resume(tmp_path: Path) -> None:
    start = tmp_path / "start.pt"
    network = Hypernetwork(hypernetwork_config(compose_config("train").hypernet), sizes=TINY_WIDTHS)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    files.save_hypernetwork(network, start)
    common = [f"hypernet.init_from={start}", "hypernet.sizes=auto", "train.max_steps=4",
              "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_top_k=-1"]  # fmt: skip
    a_dir, b_dir, r_dir = tmp_path / "a", tmp_path / "b", tmp_path / "r"
    run(compose_config("train", train_overrides(tmp_path, a_dir, *common, "seed=1")))
    run(compose_config("train", train_overrides(tmp_path, b_dir, *common, "seed=2")))
    a, b = read_metric(a_dir), read_metric(b_dir)
    assert sorted(a) == [0, 2, 4]
    assert a[0] == b[0]  # same starting weights, other seed: the very same number
    assert a[2] != b[2]  # the runs trained differently, and val/loss sees it
    # resume from step 2 of run a: the same values at steps 2 and 4
    checkpoint = tmp_path / "step2.ckpt"
    saved = sorted(p.name for p in (a_dir / "checkpoints").iterdir())
    assert "step-step=2.ckpt" in saved, saved
    shutil.copy(a_dir / "checkpoints" / "step-step=2.ckpt", checkpoint)
    run(compose_config("train", train_overrides(tmp_path, r_dir, *common, "seed=1", f"ckpt_path={checkpoint}")))
    resumed = read_metric(r_dir)
    assert resumed[2] == a[2] and resumed[4] == a[4]


def test_without_held_out_data_it_says_so_once_and_returns_train_loss(train_cfg, caplog) -> None:
    cfg = train_cfg("data.val_count=0", "callbacks.preview.every=0", "callbacks.preview.at_end=false", steps=2)
    built = build_run(cfg)
    with caplog.at_level(logging.WARNING):
        value = fit(built, cfg)
    assert sum("no held-out images" in r.getMessage() for r in caplog.records) == 1
    assert "val/loss" not in built.trainer.callback_metrics
    assert value == pytest.approx(float(built.trainer.callback_metrics["train/loss"]), rel=0, abs=0)


def test_the_final_value_is_said_with_the_step_0_value(train_cfg, caplog) -> None:
    cfg = train_cfg("callbacks.preview.every=0", "callbacks.preview.at_end=false", steps=2)
    built = build_run(cfg)
    with caplog.at_level(logging.INFO, logger="hyperlit.callbacks.validation"):
        fit(built, cfg)
    scores = next(c for c in built.trainer.callbacks if hasattr(c, "scores")).scores
    final = float(built.trainer.callback_metrics["val/loss"])
    assert final == scores[2] and final != scores[0]  # the end scores the weights after the last step
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation: val/loss")]
    assert lines == [f"validation: val/loss {final:.4g} after 2 steps (step 0: {scores[0]:.4g})"]
