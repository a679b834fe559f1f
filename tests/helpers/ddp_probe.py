"""Test-only callback for multi-process runs: each rank records what it trained on and the hypernetwork after
every optimizer step (and its EMA, when the run keeps one). Enabled from the command line with
``+callbacks.probe._target_=helpers.ddp_probe.DDPProbe +callbacks.probe.dirpath=DIR`` and ``PYTHONPATH=tests``.

It writes one file per rank on purpose (that is what the test compares); nothing in hyperlit does that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L

from hyperlit.callbacks.ema import EMA, averaged_weights
from hyperlit.io import atomic_write_text


def state_digest(module: Any) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class DDPProbe(L.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.digests: list[str] = []
        self.averages: list[str] = []
        self.batches: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        encoded = getattr(trainer.datamodule, "last_encoded", None)
        self.info = {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            # encoder calls made by this rank's setup(): 0 when prepare_data (local rank 0) filled the cache
            "setup_vae_calls": getattr(encoded, "vae_calls", None),
            "setup_text_calls": getattr(encoded, "text_calls", None),
            "initial_digest": state_digest(pl_module.hypernetwork),
        }

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append({"epoch": trainer.current_epoch, "captions": list(batch["caption"])})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.digests.append(f"{trainer.global_step} {state_digest(pl_module.hypernetwork)}")
        if EMA.find(trainer) is not None:  # the run's average too (this callback comes after the EMA's update)
            with averaged_weights(trainer, pl_module):
                self.averages.append(f"{trainer.global_step} {state_digest(pl_module.hypernetwork)}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        self.dirpath.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dirpath / f"digest-rank{rank}.txt", "\n".join(self.digests) + "\n")
        if self.averages:
            atomic_write_text(self.dirpath / f"average-rank{rank}.txt", "\n".join(self.averages) + "\n")
        record = {**self.info, "batches": self.batches, "global_step": trainer.global_step}
        atomic_write_text(self.dirpath / f"probe-rank{rank}.json", json.dumps(record, indent=1))
