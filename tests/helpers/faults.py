"""Test-only callback that sends a signal to its own process once, in the middle of a chosen optimizer step.

Enabled from the command line with ``+callbacks.fault._target_=helpers.faults.SignalOnce`` and its arguments (and
``PYTHONPATH=tests``). The marker file makes it fire in one attempt only: the same command started again (a
requeued job, a torchrun restart) finds the marker and runs undisturbed, as does a reference run whose marker the
test created beforehand.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch


class SignalOnce(L.Callback):
    def __init__(self, marker: str, step: int, signal_name: str = "SIGUSR1", rank: int = 0) -> None:
        self.marker = Path(marker)
        self.step = step  # fires during this optimizer step (1-based), between the backward pass and the update
        self.signum = signal.Signals[signal_name]
        self.rank = rank

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step + 1 != self.step or trainer.global_rank != self.rank or self.marker.exists():
            return
        self.marker.write_text(f"{self.signum.name} at step {self.step}\n")
        os.kill(os.getpid(), self.signum)  # Python runs the handler right here, mid-step
