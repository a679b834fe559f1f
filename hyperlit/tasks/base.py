"""What every task's ``build(cfg)`` returns: the validated parts of one run, with the weights not yet loaded.

``build`` checks everything that reads no weights; ``load_module`` then reads the weights. The runner builds the
loggers, callbacks and Trainer in between, so a bad Trainer argument is also an error before any weights load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl


def no_report(module: pl.LightningModule) -> str | None:
    return None


@dataclass
class TaskParts:
    """The runner adds loggers, the config's callbacks and the trainer around these, then fits."""

    load_module: Callable[[], pl.LightningModule]  # reads the weights: called last
    datamodule: pl.LightningDataModule
    callbacks: list[pl.Callback] = field(default_factory=list)  # task callbacks that come before the config's
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # Trainer arguments the task needs (max_steps...)
    ckpt_path: str | None = None  # a checked Lightning checkpoint to resume from
    # Called after fit with the module: logs what was skipped or went wrong; returns why the result is unusable.
    report: Callable[[pl.LightningModule], str | None] = no_report
