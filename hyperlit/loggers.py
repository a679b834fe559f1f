"""Lightning's CSV logger, made to continue a run's ``metrics.csv`` when the run resumes in its own run dir.

Lightning's writer deletes an existing ``metrics.csv`` when it starts, so a requeued SLURM job, a torchrun restart or
``ckpt_path=last`` would lose every row logged before the interruption. This writer keeps the file and its header
and appends; steps trained again after a resume appear twice, with the same values when the resume is exact.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning's version removes metrics.csv here; read its header instead, so new rows fit the old columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class CSVLogger(LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose ``metrics.csv`` survives a resume (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
