"""The data check before training: the images' round trip through the base's VAE (callbacks/vae_check.py)."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest
import torch
from helpers.config import QUIET_RUN, compose_config
from helpers.paths import REPO_ROOT, SAMPLE_DIR
from helpers.scripts import load_script
from PIL import Image, ImageDraw

from hyperlit import models
from hyperlit.callbacks.vae_check import PANEL_NAME, VAERoundTripCheck
from hyperlit.runner import build_run, fit

QUIET = ["callbacks.preview.every=0", "callbacks.preview.at_end=false", "callbacks.export.save_every=0"]


def numpy_round_trip_psnr(vae, path) -> float:
    """An independent reference: diffusers' VAE directly (posterior mean), PSNR on 8-bit images in numpy."""
    original = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(original.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample[0].permute(1, 2, 0).numpy()
    decoded = np.round((np.clip(y, -1, 1) + 1) * 127.5).astype(np.uint8)
    mse = np.mean((original.astype(np.float64) / 255 - decoded.astype(np.float64) / 255) ** 2)
    return 10 * math.log10(1 / mse)


def cannot_hold(folder, n: int = 6) -> None:
    """Images the tiny VAE cannot hold: an orange gradient with a black-outlined disc (7 dB, the issue's case)."""
    folder.mkdir()
    t = np.linspace(0, 1, 64)
    ramp = (t[None, :, None] + t[:, None, None]) / 2
    background = ((1 - ramp) * np.array([255, 214, 120]) + ramp * np.array([214, 84, 0])).astype(np.uint8)
    for k in range(n):
        img = Image.fromarray(background)
        r, c = 12 + k, 24 + 2 * k
        ImageDraw.Draw(img).ellipse((c - r, c - r, c + r, c + r), fill=(40, 90, 220), outline=(0, 0, 0), width=3)
        img.save(folder / f"{k:02d}.png")
        (folder / f"{k:02d}.txt").write_text("a blue circle")


def the_check(built) -> VAERoundTripCheck:
    return next(c for c in built.trainer.callbacks if isinstance(c, VAERoundTripCheck))


def test_sample_psnr_equals_a_hand_computation_quietly_with_panel_and_metric(train_cfg, tmp_path, caplog):
    cfg = train_cfg(*QUIET, "logger=csv", steps=1)
    built = build_run(cfg)
    with caplog.at_level(logging.INFO, logger="hyperlit"):
        fit(built, cfg)
    report = the_check(built).report
    assert report is not None and len(report.psnr) == 16  # every image, the two held out included
    vae = built.module.components.vae
    by_name = {p.name: p for p in SAMPLE_DIR.glob("*.png")}
    for where, value in zip(report.where, report.psnr, strict=True):
        assert value == pytest.approx(numpy_round_trip_psnr(vae, by_name[where.split("/")[-1]]), abs=0.02)
    assert report.mean == pytest.approx(np.mean(report.psnr)) and report.worst == min(report.psnr)
    assert report.level == 22.0 and not report.warned  # the tiny family's level; the sample holds at ~27.5 dB
    lines = [r.getMessage() for r in caplog.records if r.name == "hyperlit.callbacks.vae_check"]
    assert len(lines) == 1 and f"mean {report.mean:.1f} dB, worst {report.worst:.1f} dB" in lines[0]
    assert all(r.levelno < logging.WARNING for r in caplog.records if r.name == "hyperlit.callbacks.vae_check")
    with Image.open(tmp_path / "run" / PANEL_NAME) as panel:  # 8 worst: image | round trip | difference
        assert panel.size == (3 * 64, 8 * 64)
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    logged = [float(r["data/vae_psnr"]) for r in rows if r.get("data/vae_psnr")]
    assert logged == [pytest.approx(report.mean)]


def test_images_the_vae_cannot_hold_warn_in_one_line(train_cfg, tmp_path, caplog):
    folder = tmp_path / "orange"
    cannot_hold(folder)
    cfg = train_cfg(*QUIET, "data=folder", f"data.path={folder}", "data.resolution=64",
                    "callbacks.vae_check.panel_images=4", steps=1)  # fmt: skip
    built = build_run(cfg)
    with caplog.at_level(logging.INFO, logger="hyperlit"):
        fit(built, cfg)
    report = the_check(built).report
    assert report is not None and report.warned and report.mean < 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "VAE" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"{report.mean:.1f} dB, below 22.0 dB" in warnings[0] and "callbacks.vae_check.warn_psnr" in warnings[0]
    with Image.open(tmp_path / "run" / PANEL_NAME) as panel:
        assert panel.size == (3 * 64, 4 * 64)
        # the first row is the worst image: its left third is that file, pixel for pixel
        worst = report.where[int(np.argmin(report.psnr))]
        assert np.array_equal(np.asarray(panel.convert("RGB"))[:64, :64], np.asarray(Image.open(worst).convert("RGB")))


def test_switched_off_it_neither_reports_nor_writes(train_cfg, tmp_path):
    cfg = train_cfg(*QUIET, "callbacks.vae_check.enabled=false", steps=1)
    built = build_run(cfg)
    fit(built, cfg)
    assert the_check(built).report is None and not (tmp_path / "run" / PANEL_NAME).exists()


BAD = [
    ("callbacks.vae_check.warn_psnr=-3", "callbacks.vae_check.warn_psnr: -3 is not allowed"),
    ("callbacks.vae_check.warn_psnr=loud", "callbacks.vae_check.warn_psnr: 'loud' is not allowed"),
    ("callbacks.vae_check.warn_psnr=true", "callbacks.vae_check.warn_psnr: True is not allowed"),
    ("callbacks.vae_check.enabled=maybe", "callbacks.vae_check.enabled: 'maybe' is not allowed"),
    ("callbacks.vae_check.panel_images=-1", "callbacks.vae_check.panel_images: -1 is not allowed"),
    ("callbacks.vae_check.batch_size=0", "callbacks.vae_check.batch_size: 0 is not allowed"),
    ("callbacks.vae_check.max_images=0", "callbacks.vae_check.max_images: 0 is not allowed"),
]


@pytest.mark.parametrize(("override", "start"), BAD, ids=[o for o, _ in BAD])
def test_bad_values_are_refused_at_the_door(override, start, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was raised")

    monkeypatch.setattr(models, "load_components", refuse)
    monkeypatch.delenv("HYPERLIT_DEBUG", raising=False)
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", *QUIET_RUN, override])
    with pytest.raises(SystemExit) as exit_info:
        load_script(REPO_ROOT / "train.py", "hyperlit_train_entry").entry(cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hyperlit: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"hyperlit: error: {start}"), lines
