"""What every task's ``build(cfg)`` returns: the built parts of one run, validated, not yet fitted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl


def no_report() -> str | None:
    return None


@dataclass
class TaskParts:
    """The runner adds loggers, the config's callbacks and the trainer around these, then fits."""

    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    callbacks: list[pl.Callback] = field(default_factory=list)  # task callbacks that come before the config's
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # Trainer arguments the task needs (max_steps...)
    ckpt_path: str | None = None  # a checked Lightning checkpoint to resume from
    # Called after fit: logs what was skipped or went wrong; returns why the result is unusable, or None.
    report: Callable[[], str | None] = no_report
