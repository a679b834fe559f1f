"""``metrics.csv`` and ``loss.png`` in every run dir, whatever logger the run chose (as A1111 writes its loss CSV).

A Lightning logger that the runner adds beside the configured ones: it receives exactly the values the others
receive (``train/loss``, ``train/lr``, ``val/loss``, ``preview/change``, the VAE's losses and PSNR...), keeps one
row per step and rewrites the file atomically (at most every few seconds, and at the end). Global rank 0 only.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from hyperlit.io import atomic_path, atomic_write_text
from hyperlit.plot import Series, plot_metrics

log = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"
PLOT_NAME = "loss.png"
# The columns a user reads first, in this order; every other metric follows, sorted.
FIRST = ("train/loss", "val/loss", "train/lr", "preview/change", "train/total", "val/psnr")
LOSSES = ("train/loss", "val/loss", "train/total")  # the plot's top panel, where present
FLUSH_SECONDS = 5.0


class MetricsFile(Logger):
    """Every logged scalar, one row per step, in ``<dirpath>/metrics.csv``; ``loss.png`` drawn at the end."""

    def __init__(self, dirpath: str | Path, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.flush_seconds = flush_seconds
        self.rows: dict[int, dict[str, float]] = {}
        self._last_flush = 0.0

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return ""

    @property
    def csv_path(self) -> Path:
        return self.dirpath / CSV_NAME

    @property
    def plot_path(self) -> Path:
        return self.dirpath / PLOT_NAME

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the composed config is in .hydra/ already

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = self.rows.setdefault(int(step or 0), {})
        for key, value in metrics.items():
            if key == "epoch":
                continue
            number = float(value.item() if hasattr(value, "item") else value)
            if math.isfinite(number):
                row[key] = number
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.save()

    def columns(self) -> list[str]:
        keys = {key for row in self.rows.values() for key in row}
        return ["step", *[k for k in FIRST if k in keys], *sorted(keys.difference(FIRST))]

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for step in sorted(self.rows):
            writer.writerow({"step": step, **{k: repr(v) for k, v in self.rows[step].items()}})
        return out.getvalue()

    @rank_zero_only
    def save(self) -> None:
        if not self.rows:
            return
        atomic_write_text(self.csv_path, self.csv_text())
        self._last_flush = time.monotonic()

    def series(self, key: str) -> Series:
        points = [(step, row[key]) for step, row in sorted(self.rows.items()) if key in row]
        return Series(key, [p[0] for p in points], [p[1] for p in points])

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
        losses = [self.series(k) for k in LOSSES if any(k in row for row in self.rows.values())]
        rate = self.series("train/lr")
        if not any(s.steps for s in losses):
            return
        image = plot_metrics(losses, rate if rate.steps else None)
        with atomic_path(self.plot_path, suffix=".png") as tmp:
            image.save(tmp, format="PNG")
        log.debug("wrote %s and %s", self.csv_path, self.plot_path)
