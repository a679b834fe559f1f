"""`train.learning_rate=auto`: the learning-rate range test before training (callbacks/lr_range.py)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.config import QUIET_RUN, compose_config
from helpers.paths import REPO_ROOT
from helpers.scripts import load_script
from PIL import Image

from hyperlit import models
from hyperlit.attention import hypernetworks_attached
from hyperlit.callbacks.lr_range import CHECKPOINT_KEY, PLOT_NAME, LRAutoOptions, LRRangeTest, pick_rate
from hyperlit.callbacks.validation import validation_loss
from hyperlit.files.torch_file import load_torch_file
from hyperlit.runner import build_run, fit

QUIET = ["callbacks.preview.every=0", "callbacks.preview.at_end=false", "callbacks.export.save_every=0",
         "callbacks.vae_check.enabled=false"]  # fmt: skip
SWEEP = ["train.learning_rate=auto", "train.lr_auto.count=3", "train.lr_auto.min=1e-4", "train.lr_auto.max=1e-2",
         "train.lr_auto.steps_per_rate=2"]  # fmt: skip


def reference_pick(rates: list[float], scores: list[float]) -> float:
    """The documented rule, computed another way: numpy's argmin over the finite scores, then one rate lower."""
    masked = np.where(np.isfinite(scores), scores, np.inf)
    return rates[max(int(np.argmin(masked)) - 1, 0)]


@pytest.mark.parametrize(
    "scores",
    [
        [0.30, 0.25, 0.20, 0.22, math.inf],
        [0.10, 0.20, 0.30, 0.40, 0.50],  # the lowest rate is best: it stays (inside the sweep)
        [0.30, 0.29, 0.28, 0.27, 0.26],
        [math.inf, 0.20, 0.20, 0.30, math.inf],  # a tie: the lower rate
    ],
)
def test_pick_lies_in_the_sweep_and_follows_the_rule(scores):
    rates = LRAutoOptions(min=1e-5, max=1e-1, count=5).rates()
    assert rates == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    assert pick_rate(rates, scores) == reference_pick(rates, scores)
    assert pick_rate(rates, scores) in rates


def test_every_rate_diverging_is_a_one_line_error():
    with pytest.raises(ValueError, match="diverged at every rate") as err:
        pick_rate([1e-2, 1e-1], [math.inf, math.inf])
    assert "\n" not in str(err.value)


def test_auto_sweeps_from_the_same_start_trains_at_the_pick_and_writes_the_curve(train_cfg, tmp_path):
    cfg = train_cfg(*QUIET, *SWEEP, "train.lr_scheduler=linear", "train.lr_warmup_steps=1", steps=2)
    built = build_run(cfg)
    module = built.module
    initial = {k: v.clone() for k, v in module.hypernetwork.state_dict().items()}
    fit(built, cfg)
    sweep = next(c for c in built.trainer.callbacks if isinstance(c, LRRangeTest))
    result = sweep.result
    assert result is not None and result.rates == pytest.approx([1e-4, 1e-3, 1e-2])
    assert result.rate in result.rates and result.rate == reference_pick(result.rates, result.scores)
    # auto replaces the base rate only: the schedule (linear decay after one warm-up step) is built on it
    scheduler = built.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [result.rate] and module.learning_rate == result.rate
    # training started from the untouched initial weights: its step-0 val/loss is the sweep's untrained score
    validation = next(c for c in built.trainer.callbacks if type(c).__name__ == "ValidationLoss")
    assert validation.scores[0] == result.start
    # each score is a fresh copy of those weights trained at its rate (here recomputed for the last rate)
    hn = module.hypernetwork
    hn.load_state_dict(initial)
    hn.train()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(hn.parameters(), lr=result.rates[-1], weight_decay=0.01)
    with hypernetworks_attached(module.components.unet, [hn]):
        for batch in built.datamodule.sweep_batches(2):
            loss = module.compute_loss(batch, generator=generator).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        expected = validation_loss(module, built.datamodule.held_out, int(cfg.callbacks.validation.timesteps))
    assert result.scores[-1] == expected
    with Image.open(tmp_path / "run" / PLOT_NAME) as plot:
        assert plot.size == (640, 400)
    stored = load_torch_file(tmp_path / "run" / "checkpoints" / "last.ckpt")[CHECKPOINT_KEY]
    assert stored["rate"] == result.rate and stored["scores"] == result.scores


def test_a_resumed_run_keeps_the_rate_and_sweeps_no_more(train_cfg, tmp_path):
    first = train_cfg(*QUIET, *SWEEP, "callbacks.checkpoint.every_n_train_steps=2", steps=2)
    built = build_run(first)
    fit(built, first)
    rate = built.module.learning_rate
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    second = train_cfg(*QUIET, *SWEEP, f"ckpt_path={ckpt}", "train.lr_auto.min=1e-6", steps=4)
    resumed = build_run(second)
    assert not any(isinstance(c, LRRangeTest) for c in resumed.trainer.callbacks)
    assert resumed.module.learning_rate == rate
    fit(resumed, second)
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == rate
    assert load_torch_file(ckpt)[CHECKPOINT_KEY]["rate"] == rate  # kept in the resumed run's checkpoints too


def test_resuming_a_fixed_rate_checkpoint_with_auto_is_refused(train_cfg, tmp_path):
    first = train_cfg(*QUIET, "train.learning_rate=1e-3", "callbacks.checkpoint.every_n_train_steps=1", steps=1)
    fit(build_run(first), first)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # the checkpoint's config says which rate it trained at: the resume check names the key before any sweep
    with pytest.raises(ValueError, match=r"differ \(checkpoint -> now\): train\.learning_rate \(0\.001 -> 'auto'\)"):
        build_run(train_cfg(*QUIET, *SWEEP, f"ckpt_path={ckpt}", steps=2))


BAD = [
    (["train.learning_rate=fast"], "train.learning_rate: 'fast' is neither a number nor"),
    (["train.learning_rate='auto:100'"], "train.learning_rate: item 'auto:100'"),
    (["train.learning_rate=auto", "train.lr_auto.min=0"], "train.lr_auto.min: 0 is not allowed"),
    (["train.learning_rate=auto", "train.lr_auto.max=2"], "train.lr_auto.max: 2 is not allowed"),
    (["train.learning_rate=auto", "train.lr_auto.min=1e-2", "train.lr_auto.max=1e-3"], "train.lr_auto.max: 0.001"),
    (["train.learning_rate=auto", "train.lr_auto.count=1"], "train.lr_auto.count: 1 is not allowed"),
    (["train.learning_rate=auto", "train.lr_auto.steps_per_rate=2.5"], "train.lr_auto.steps_per_rate: 2.5"),
    (["train.learning_rate=auto", "+train.lr_auto.stepz=3"], "train.lr_auto.stepz: 3 is not allowed; no part of"),
    (["train.learning_rate=auto", "data.val_count=0"], "train.learning_rate: 'auto' is not allowed; each rate"),
]


@pytest.mark.parametrize(("overrides", "start"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_are_refused_at_the_door(overrides, start, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was raised")

    monkeypatch.setattr(models, "load_components", refuse)
    monkeypatch.delenv("HYPERLIT_DEBUG", raising=False)
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", *QUIET_RUN, *overrides])
    with pytest.raises(SystemExit) as exit_info:
        load_script(REPO_ROOT / "train.py", "hyperlit_train_entry").entry(cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hyperlit: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"hyperlit: error: {start}"), lines


@pytest.mark.slow
def test_two_processes_agree_on_the_rate_and_rank_0_writes_once(tmp_path):
    """trainer=ddp_cpu: each rank scores a share of the rates; both train at the same pick (their weights stay equal
    step by step), rank 0 alone prints the line and writes the curve and the data check's panel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    tests_path = os.pathsep.join([str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=tests_path)  # fmt: skip
    (tmp_path / "work").mkdir()
    command = [
        sys.executable, str(REPO_ROOT / "train.py"), "trainer=ddp_cpu", "logger=csv", "train.max_steps=2",
        f"hydra.run.dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", "~callbacks.progress",
        "trainer.enable_progress_bar=false", "callbacks.preview.every=0", "callbacks.preview.at_end=false",
        "callbacks.ema.enabled=false", "data.batch_size=2", *SWEEP,
        "+callbacks.probe._target_=helpers.ddp_probe.DDPProbe", f"+callbacks.probe.dirpath={tmp_path / 'probe'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    output = done.stdout + done.stderr
    assert output.count("train.learning_rate=auto: ") == 1 and output.count("data: VAE round trip of 16") == 1
    probes = [json.loads((tmp_path / "probe" / f"probe-rank{r}.json").read_text()) for r in (0, 1)]
    assert probes[0]["world_size"] == 2 and probes[0]["initial_digest"] == probes[1]["initial_digest"]
    digests = [(tmp_path / "probe" / f"digest-rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1] and len(digests[0].split("\n")) == 3
    out = tmp_path / "out"
    assert (out / PLOT_NAME).is_file() and (out / "vae_check.png").is_file()
    stored = load_torch_file(out / "checkpoints" / "last.ckpt")[CHECKPOINT_KEY]
    assert stored["rate"] == reference_pick(stored["rates"], stored["scores"])
    assert all(s >= 0 for s in stored["scores"])  # every rate was scored by one of the ranks
    assert not list(tmp_path.rglob("*.tmp*"))
