"""Write the hypernetwork as A1111 files while training: ``<name>-<step>.pt`` every N steps, ``<name>.pt`` at the end.

Every ``.pt`` stores ``name: <name>`` (the base name, as A1111's trainer does, snapshots included). At the end,
``<name>.hyperlit.safetensors`` (hyperlit's own pickle-free copy, named so nobody takes it for a client file) and,
when ComfyUI's loader would build Dropout layers for the final ``.pt``, ``<name>.comfyui.pt``: the inference copy
without Dropout slots that ComfyUI needs, since ComfyUI runs Dropout layers at inference (see
:mod:`hyperlit.files.comfyui`).

With ``callbacks.ema.enabled`` every file holds the EMA weights (:mod:`hyperlit.callbacks.ema`). Only global rank
0 writes; every file goes through a temporary name (see :mod:`hyperlit.io`), so an interrupted
run leaves the last complete files in place. The final files are also written when training is interrupted,
as A1111 does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from hyperlit.callbacks.ema import averaged_weights
from hyperlit.files import comfyui, save_hypernetwork, strip_dropout, to_file_content, write_file
from hyperlit.files.clients import COMFYUI_COPY, HYPERLIT_SAFETENSORS

log = logging.getLogger(__name__)


class HypernetworkExport(L.Callback):
    def __init__(
        self,
        dirpath: str,
        save_every: int = 500,
        save_optimizer_state: bool = False,
        safetensors: bool = True,
        comfyui_copy: bool = True,
        log_artifact: bool = True,
    ) -> None:
        if save_every < 0:
            raise ValueError(f"callbacks.export.save_every: {save_every} is not allowed; use 0 (off) or more")
        self.dirpath = Path(dirpath)
        self.save_every = save_every
        self.save_optimizer_state = save_optimizer_state
        self.safetensors = safetensors
        self.comfyui_copy = comfyui_copy
        self.log_artifact = log_artifact
        self._last_saved_step = -1
        self.final_path: Path | None = None
        self.snapshots: dict[int, Path] = {}  # step -> <name>-<step>.pt written by this process

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stem: str) -> Path:
        hn = pl_module.hypernetwork
        hn.step = pl_module.initial_step + trainer.global_step
        hn.sd_checkpoint = pl_module.components.checkpoint_hash
        hn.sd_checkpoint_name = pl_module.components.checkpoint_name
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        return save_hypernetwork(
            hn,
            self.dirpath / f"{stem}.pt",
            optimizer_state=optimizer.state_dict() if self.save_optimizer_state and optimizer else None,
            optimizer_name=type(optimizer).__name__ if optimizer else "AdamW",
            name=hn.name,  # the base name in snapshots too, as A1111's trainer stores it
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self.save_every or step == 0 or step % self.save_every or step == self._last_saved_step:
            return
        self._last_saved_step = step
        if trainer.is_global_zero:
            with averaged_weights(trainer, pl_module):
                path = self._write(trainer, pl_module, f"{pl_module.hypernetwork.name}-{step}")
            self.snapshots[step] = path
            log.info("saved %s", path)

    def save_final(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        hn = pl_module.hypernetwork
        with averaged_weights(trainer, pl_module):
            self.final_path = self._write(trainer, pl_module, hn.name)
            if self.safetensors:
                save_hypernetwork(hn, self.dirpath / f"{hn.name}{HYPERLIT_SAFETENSORS}", name=hn.name)
            content = to_file_content(hn)
            if self.comfyui_copy and comfyui.verdict(content).dropout_layers:  # exactly where ComfyUI builds Dropout
                copy = write_file(self.dirpath / f"{hn.name}{COMFYUI_COPY}", strip_dropout(content), hn.name)
                log.info("saved %s (for ComfyUI, which runs Dropout layers at inference)", copy)
        log.info("saved %s", self.final_path)
        if self.log_artifact:
            _log_wandb_artifact(trainer, self.final_path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_final(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > 0:
            log.warning("interrupted at step %d: writing the final files", trainer.global_step)
            self.save_final(trainer, pl_module)


def _log_wandb_artifact(trainer: L.Trainer, path: Path) -> None:
    """Attach the final .pt to the wandb run when that run is online (offline runs keep it on disk only)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and not logger._offline:
            import wandb

            artifact = wandb.Artifact(name=path.stem, type="hypernetwork")
            artifact.add_file(str(path))
            logger.experiment.log_artifact(artifact)
