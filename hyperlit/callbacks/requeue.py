"""SLURM pre-emption at a step boundary: Lightning's requeue (HPC checkpoint + ``scontrol requeue``), deferred.

Lightning's ``SLURMEnvironment(auto_requeue=True)`` saves ``hpc_ckpt_N.ckpt`` and requeues the job from inside
the signal handler, i.e. wherever Python happens to be when SIGUSR1 arrives: between the backward pass and the
optimizer step, the checkpoint would hold this step's random draws and data position but not its update, and the
resumed run would differ from one never stopped. This callback keeps Lightning's handler but calls it at the end
of the step in which the signal arrived (where ModelCheckpoint saves too), on every rank at the same step.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class RequeueAtStepBoundary(pl.Callback):
    def __init__(self, environment: SLURMEnvironment) -> None:
        self.environment = environment
        self.pending = False  # the requeue signal arrived and the save has not happened yet
        self._lightning_handler: Callable[[int, FrameType | None], Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its handlers just before the fit loop starts (after on_fit_start): wrap it here.
        signum = self.environment.requeue_signal
        handler = signal.getsignal(signum) if signum is not None else None
        if not self.environment.auto_requeue or not callable(handler):
            return
        self._lightning_handler = handler
        signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if not self.pending:
            log.info("signal %d: the HPC checkpoint is saved and the job requeued at the end of this step", signum)
        self.pending = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._lightning_handler is None:
            return
        pending = self.pending
        if trainer.world_size > 1:
            # SLURM signals every task, not at the same instant: all save at the first boundary any rank reached
            # with the signal (trainer.save_checkpoint is collective).
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if pending:
            self.pending = False
            assert self.environment.requeue_signal is not None
            self._lightning_handler(self.environment.requeue_signal, None)
