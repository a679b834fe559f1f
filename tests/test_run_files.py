"""What every run leaves and says at the end: metrics.csv and loss.png in the run dir whatever the logger, the
end-of-run summary, and the table a multirun / Optuna study ends with."""

from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.paths import REPO_ROOT
from hydra.core.utils import JobReturn, JobStatus
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from PIL import Image

from hyperlit.callbacks.export import HypernetworkExport
from hyperlit.callbacks.preview import PreviewImages
from hyperlit.callbacks.validation import ValidationLoss
from hyperlit.metrics_file import MetricsFile
from hyperlit.plot import COLOURS, LR_COLOUR, Series, plot_metrics
from hyperlit.quiet import drop_lightning_tips, drop_wandb_anonymous
from hyperlit.runner import build_run, fit
from hyperlit.study_table import JobRow, StudyTable, format_table


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def callback(built, kind):
    return next(cb for cb in built.trainer.callbacks if isinstance(cb, kind))


def test_metrics_csv_holds_the_logged_values_and_the_summary_says_where_things_are(train_cfg, tmp_path, caplog):
    cfg = train_cfg(
        "logger=csv", "trainer.log_every_n_steps=1", "callbacks.validation.every=2", "callbacks.preview.every=2",
        "callbacks.export.save_every=2", "train.learning_rate=1e-3", steps=4,
    )  # fmt: skip
    built = build_run(cfg)
    with caplog.at_level(logging.INFO, logger="hyperlit.runner"):
        fit(built, cfg)
    run = tmp_path / "run"
    ours = read_rows(run / "metrics.csv")
    lightning = read_rows(run / "csv" / "metrics.csv")  # Lightning's own CSVLogger: the logged values
    assert list(ours[0])[:5] == ["step", "train/loss", "val/loss", "train/lr", "preview/change"]
    assert [int(r["step"]) for r in ours] == sorted({int(r["step"]) for r in ours})  # one row per step
    for key in ("train/loss", "train/lr", "val/loss", "preview/change"):
        mine, theirs = column(ours, key), column(lightning, key)
        assert mine and mine.keys() == theirs.keys(), key
        assert all(mine[s] == theirs[s] for s in mine), key  # the same float, not a rounded copy
    validation = callback(built, ValidationLoss)
    preview = callback(built, PreviewImages)
    assert column(ours, "val/loss") == validation.scores  # steps 0, 2, 4
    assert column(ours, "preview/change") == preview.changes
    assert len(column(ours, "train/loss")) == 4

    summary = [r.getMessage().removeprefix("summary: ") for r in caplog.records if r.getMessage().startswith("summary")]
    scores = validation.scores
    export = callback(built, HypernetworkExport)
    best = min([2, 4], key=lambda s: (scores[s], -s))  # snapshot swish_121-2.pt or the final file (step 4)
    best_file = "hypernetworks/swish_121-2.pt" if best == 2 else "hypernetworks/swish_121.pt"
    assert summary[0] == f"run dir: {run} (metrics.csv, loss.png)"
    assert summary[1] == "hypernetwork: hypernetworks/swish_121.pt and 2 snapshots beside it"
    assert export.snapshots == {s: run / "hypernetworks" / f"swish_121-{s}.pt" for s in (2, 4)}
    assert summary[2] == "preview grids: 3 in images/"
    low = min(scores, key=lambda s: (scores[s], -s))
    assert summary[3] == (
        f"val/loss: {scores[0]:.4g} at step 0 -> {scores[4]:.4g} at step 4 (lowest {scores[low]:.4g} at step {low})"
    )
    assert summary[4] == f"best snapshot: {best_file} (val/loss {scores[best]:.4g})"
    changes = preview.changes
    assert summary[5].startswith(
        f"preview/change (multiplier 0 vs 1, of 255): {changes[0]:.2f} at step 0 -> {changes[4]:.2f} at step 4"
    )
    assert len(summary) == 6


def test_a_run_without_a_logger_still_writes_metrics_csv_and_loss_png(train_cfg, tmp_path):
    cfg = train_cfg("logger=none", "callbacks.preview.every=0", "callbacks.preview.at_end=false", steps=3)
    built = build_run(cfg)
    fit(built, cfg)
    run = tmp_path / "run"
    rows = read_rows(run / "metrics.csv")
    assert column(rows, "val/loss") == callback(built, ValidationLoss).scores
    assert len(column(rows, "train/lr")) == len(column(rows, "train/loss")) == 3  # every step (log_every_n_steps: 1)
    image = Image.open(run / "loss.png")
    assert image.format == "PNG" and image.size[0] == 720


def test_loss_png_draws_each_value_where_its_axes_put_it() -> None:
    loss = Series("train/loss", [1, 2, 3, 4], [0.5, 0.4, 0.45, 0.3])
    val = Series("val/loss", [0, 4], [0.6, 0.35])
    rate = Series("train/lr", [1, 2, 3, 4], [1e-3, 1e-3, 5e-4, 5e-4])
    image = np.asarray(plot_metrics([loss, val], rate))
    # an independent mapping of data to pixels: the top panel spans steps 0..4 and values 0.3..0.6 (+5 % padding)
    left, top, width, height = 70, 30, 720 - 70 - 20, 290
    low, high = 0.3 - 0.015, 0.6 + 0.015

    def at(step: float, value: float) -> tuple[int, int]:
        return round(left + step / 4 * width), round(top + height - (value - low) / (high - low) * height)

    for series in (loss, val):
        for step, value in zip(series.steps, series.values, strict=True):
            x, y = at(step, value)
            assert tuple(image[y, x]) == COLOURS[series.name], (series.name, step)
    assert (image.reshape(-1, 3) == LR_COLOUR).all(axis=1).any()  # the learning-rate panel is drawn
    plain = np.asarray(plot_metrics([loss], None))
    assert plain.shape[0] < image.shape[0]  # no learning-rate panel without a learning rate


def test_lightning_tips_and_the_wandb_anonymous_setting_are_dropped(tmp_path) -> None:
    drop_lightning_tips()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def passes(message: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None)))

    assert not passes("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]...")
    assert passes("GPU available: False, used: False")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert "anonymous" in wandb_logger._wandb_init  # what makes wandb warn; the test fails if Lightning stops it
    drop_wandb_anonymous(wandb_logger)
    assert "anonymous" not in wandb_logger._wandb_init


def job_return(num: int, value, overrides: list[str], status=JobStatus.COMPLETED) -> JobReturn:
    hydra_cfg = OmegaConf.create({"hydra": {"job": {"num": num}}})
    result = JobReturn(overrides=overrides, hydra_cfg=hydra_cfg, status=status)
    result.return_value = value
    return result


def test_study_table_marks_the_best_job_and_shows_failures(tmp_path, caplog) -> None:
    table = StudyTable()
    config = OmegaConf.create({"optimized_metric": "val/loss", "hydra": {"sweep": {"dir": str(tmp_path)}}})
    table.on_multirun_start(config)
    table.on_job_end(config, job_return(1, 0.25, ["hypernet=linear_121"]))
    table.on_job_end(config, job_return(0, 0.125, ["hypernet=swish_121"]))
    table.on_job_end(config, job_return(2, RuntimeError("boom"), ["hypernet=relu_121"], JobStatus.FAILED))
    with caplog.at_level(logging.INFO, logger="hyperlit.study_table"):
        table.on_multirun_end(config)
    lines = (tmp_path / "study.txt").read_text().splitlines()
    assert lines == [
        "   job  val/loss  overrides",
        "*    0     0.125  hypernet=swish_121",
        "     1      0.25  hypernet=linear_121",
        "     2    failed  hypernet=relu_121",
        "* best (lowest val/loss)",
    ]
    assert "\n".join(lines) in caplog.text
    assert format_table([JobRow(0, 1.0, "a"), JobRow(1, 2.0, "b")], "score", maximize=True)[2].startswith("*")


@pytest.mark.slow
def test_an_optuna_study_ends_with_its_table_and_without_set_up_chatter(tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `sweep` extra")
    sweep_dir = tmp_path / "multi"
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "train.py"), "hparams_search=optuna", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "train.max_steps=2", "logger=csv", f"hydra.sweep.dir={sweep_dir}", f"data.cache_dir={tmp_path / 'c'}",
            "callbacks.preview.every=0", "callbacks.preview.at_end=false", "~callbacks.progress",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for chatter in ("💡 Tip", "A new study created", "alembic", "Study name:", "Sampler:"):
        assert chatter not in output, chatter
    lines = (sweep_dir / "study.txt").read_text().splitlines()
    assert "\n".join(lines) in output  # the table is printed, not only written
    losses = {}
    for job in ("0", "1"):
        rows = read_rows(sweep_dir / job / "metrics.csv")
        losses[int(job)] = column(rows, "val/loss")[2]  # what run(cfg) returned: val/loss of the final weights
        overrides = " ".join(yaml.safe_load((sweep_dir / job / ".hydra" / "overrides.yaml").read_text()))
        row = next(line for line in lines[1:-1] if line[2:6].strip() == job)
        assert row.split()[-len(overrides.split()) :] == overrides.split()
        assert math.isclose(float(row[6:].split()[0]), losses[int(job)], rel_tol=5e-4)  # printed with 4 digits
    best = min(losses, key=losses.get)
    assert [line[2:6].strip() for line in lines if line.startswith("*") and "best" not in line] == [str(best)]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(losses[best], rel=1e-9)


def test_metrics_file_rewrites_atomically_and_only_on_rank_zero(tmp_path, monkeypatch) -> None:
    metrics = MetricsFile(tmp_path, flush_seconds=0)
    metrics.log_metrics({"train/loss": 0.5, "epoch": 0}, step=1)
    metrics.log_metrics({"val/loss": 0.25}, step=1)
    metrics.log_metrics({"train/loss": float("nan")}, step=2)
    assert (tmp_path / "metrics.csv").read_text() == "step,train/loss,val/loss\n1,0.5,0.25\n2,,\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    other = MetricsFile(tmp_path / "rank1", flush_seconds=0)
    other.log_metrics({"train/loss": 0.5}, step=1)
    other.finalize("success")
    assert not (tmp_path / "rank1").exists()


def test_the_vae_summary_names_its_exports_and_the_psnr_from_start_to_end(vae_cfg, tmp_path, caplog):
    cfg = vae_cfg(
        "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks.export.save_every=0",
        "logger=none", steps=4,
    )  # fmt: skip
    built = build_run(cfg)
    with caplog.at_level(logging.INFO, logger="hyperlit.runner"):
        fit(built, cfg)
    run = tmp_path / "run"
    summary = [r.getMessage().removeprefix("summary: ") for r in caplog.records if r.getMessage().startswith("summary")]
    rows = read_rows(run / "metrics.csv")
    psnr, start = column(rows, "val/psnr"), column(rows, "val/start_psnr")
    assert len(psnr) >= 2 and start
    last = max(psnr)
    assert summary[0] == f"run dir: {run} (metrics.csv, loss.png)"
    assert summary[1].startswith("VAE exports: vae/vae-ft, vae/vae-ft.vae.safetensors")
    assert summary[2] == (
        f"PSNR: {start[max(start)]:.2f} dB (the starting decoder) -> {psnr[last]:.2f} dB at step {last} "
        f"(first validation: {psnr[min(psnr)]:.2f} dB)"
    )
