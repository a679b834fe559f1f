"""Export the fine-tuned VAE every ``save_every`` task steps and at the end of training (global rank 0 only).

Files under ``dirpath``: ``<name>-<step>/`` (diffusers folder) and ``<name>-<step>.vae.safetensors`` (A1111
single file, LDM keys) during training; ``<name>/`` and ``<name>.vae.safetensors`` at the end; optionally the
discriminator as ``<name>.disc.safetensors`` so a later run can continue the GAN (Stability never published D).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from hyperlit.callbacks.ema import EMA
from hyperlit.io import atomic_path
from hyperlit.vae.export import save_diffusers_folder, save_single_file

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class VAEExport(pl.Callback):
    def __init__(
        self,
        dirpath: str,
        name: str = "vae-ft",
        save_every: int = 0,
        use_ema: bool = True,
        diffusers: bool = True,
        single_file: bool = True,
        save_discriminator: bool = True,
        dtype: str = "float32",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"export.dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        if save_every < 0:
            raise ValueError(f"export.save_every={save_every} must be >= 0 (0: only at the end)")
        if not name or "/" in name:
            raise ValueError(f"export.name={name!r} must be a plain file name")
        self.dirpath = Path(dirpath)
        self.name, self.save_every, self.use_ema = name, save_every, use_ema
        self.diffusers, self.single_file, self.save_discriminator = diffusers, single_file, save_discriminator
        self.dtype = DTYPES[dtype]
        self.written: list[Path] = []
        self._last_exported_step = -1

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stem: str) -> list[Path]:
        if not trainer.is_global_zero:
            return []
        ema = EMA.find(trainer) if self.use_ema else None
        out: list[Path] = []
        vae = pl_module.vae
        if ema is not None:
            with ema.swapped(pl_module):
                out += self._write(vae, stem)
        else:
            out += self._write(vae, stem)
        disc = getattr(pl_module, "disc", None)
        if self.save_discriminator and disc is not None:
            path = self.dirpath / f"{stem}.disc.safetensors"
            with atomic_path(path, suffix=".safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()}, str(tmp))
            out.append(path)
        self.written += out
        log.info("exported VAE: %s", ", ".join(str(p) for p in out))
        return out

    def _write(self, vae: torch.nn.Module, stem: str) -> list[Path]:
        out = []
        if self.diffusers:
            out.append(save_diffusers_folder(vae, self.dirpath / stem, self.dtype))
        if self.single_file:
            out.append(save_single_file(vae, self.dirpath / f"{stem}.vae.safetensors", self.dtype))
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = int(pl_module.step)
        if self.save_every and step % self.save_every == 0 and step != self._last_exported_step:
            self._last_exported_step = step
            self.export(trainer, pl_module, f"{self.name}-{step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "diverged", None):
            log.error("not exporting the final VAE: training diverged (%s)", pl_module.diverged)
            return
        self.export(trainer, pl_module, self.name)
