"""A Hydra callback: a multirun or Optuna study ends with one table of its jobs (job, value, overrides, best marked).

Registered in conf/hydra/default.yaml (``hydra.callbacks.study_table``). Hydra calls ``on_job_end`` in the process
that launched the job, so the table covers the jobs of in-process launchers (the basic launcher, Optuna's
sweeper); the table is also written to ``<sweep dir>/study.txt``. It also silences the study's set-up chatter
(Optuna's "A new study created", alembic's migration lines, the sweeper's name/storage/sampler lines).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hyperlit.io import atomic_write_text
from hyperlit.quiet import quiet_study_setup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobRow:
    """One job of the study: its number, the value ``run(cfg)`` returned (None: none), its overrides."""

    num: int
    value: float | None
    overrides: str
    failed: bool = False


def best_row(rows: list[JobRow], maximize: bool = False) -> JobRow | None:
    scored = [r for r in rows if r.value is not None and math.isfinite(r.value)]
    if not scored:
        return None
    return (max if maximize else min)(scored, key=lambda r: r.value)


def format_table(rows: list[JobRow], metric: str, maximize: bool = False) -> list[str]:
    """The table's lines: a header, then one line per job in job order, ``*`` before the best."""
    best = best_row(rows, maximize)
    width = max(len(metric), 8)
    lines = [f"  {'job':>4}  {metric:>{width}}  overrides"]
    for row in sorted(rows, key=lambda r: r.num):
        value = "failed" if row.failed else f"{row.value:.4g}" if row.value is not None else "-"
        mark = "*" if row is best else " "
        lines.append(f"{mark} {row.num:>4}  {value:>{width}}  {row.overrides or '(none)'}")
    goal = "highest" if maximize else "lowest"
    lines.append(f"* best ({goal} {metric})" if best else "no job returned a value")
    return lines


class StudyTable(Callback):
    """Collects every job's result and logs the table when the multirun ends."""

    def __init__(self) -> None:
        self.rows: list[JobRow] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows = []
        quiet_study_setup()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # Called for single runs too; only a multirun prints the rows (on_multirun_end).
        hydra_cfg = job_return.hydra_cfg
        num = int(OmegaConf.select(hydra_cfg, "hydra.job.num", default=len(self.rows)) if hydra_cfg else len(self.rows))
        failed = job_return.status != JobStatus.COMPLETED
        # job_return.return_value would re-raise a failed job's error here; the value itself is all the table needs
        result = None if failed else job_return._return_value
        value = float(result) if isinstance(result, int | float) and not isinstance(result, bool) else None
        self.rows.append(JobRow(num, value, " ".join(job_return.overrides or []), failed))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.rows:
            return
        metric = str(OmegaConf.select(config, "optimized_metric", default="value") or "value")
        maximize = str(OmegaConf.select(config, "hydra.sweeper.direction", default="minimize")) == "maximize"
        lines = format_table(self.rows, metric, maximize)
        log.info("study: %d jobs\n%s", len(self.rows), "\n".join(lines))
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep_dir:
            atomic_write_text(Path(sweep_dir) / "study.txt", "\n".join(lines) + "\n")
