"""A test-only callback for DDP runs of the TAESD task: each rank writes a digest of its tiny autoencoder's weights
after every generator update (only this callback writes per rank; the task's own files are rank 0's)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl


def weights_digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TAESDProbe(pl.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.dirpath.mkdir(parents=True, exist_ok=True)
        line = f"{pl_module.step} {weights_digest(pl_module.taesd.decoder.state_dict())}\n"
        with open(self.dirpath / f"digest-rank{trainer.global_rank}.txt", "a") as f:
            f.write(line)
