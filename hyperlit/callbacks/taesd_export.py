"""Export the distilled tiny autoencoder every ``save_every`` task steps and at the end (global rank 0 only).

Under ``dirpath``, at the end: ``diffusers/`` (an ``AutoencoderTiny`` folder for ``from_pretrained``) and
``<name>_encoder`` / ``<name>_decoder`` ``.safetensors`` + ``.pth`` in madebyollin's layout (A1111
``models/VAE-taesd``, ComfyUI ``models/vae_approx``); the same under ``step-<N>/`` during training. A half that did
not train is not written as a file of its own (it would be random weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from hyperlit.callbacks.ema import EMA
from hyperlit.io import atomic_path
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.taesd_layout import save_taesd_files
from hyperlit.vae.taesd_read import TRAINED_PARTS

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TAESDExport(pl.Callback):
    def __init__(
        self,
        dirpath: str,
        name: str = "taesd",
        save_every: int = 0,
        use_ema: bool = True,
        diffusers: bool = True,
        madebyollin: bool = True,
        save_discriminator: bool = True,
        dtype: str = "float32",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"callbacks.export.dtype: {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
        if not isinstance(save_every, int) or save_every < 0:
            raise ValueError(f"callbacks.export.save_every: {save_every!r} is not allowed; use 0 (end only) or more")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"callbacks.export.name: {name!r} is not allowed; use a plain file name stem")
        self.dirpath = Path(dirpath)
        self.name, self.save_every, self.use_ema = name, save_every, use_ema
        self.diffusers, self.madebyollin, self.save_discriminator = diffusers, madebyollin, save_discriminator
        self.dtype = DTYPES[dtype]
        self.written: list[Path] = []
        self._last_exported_step = -1

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, folder: Path) -> list[Path]:
        if not trainer.is_global_zero:
            return []
        ema = EMA.find(trainer) if self.use_ema else None
        if ema is not None:
            with ema.swapped(pl_module):
                out = self._write(pl_module, folder)
        else:
            out = self._write(pl_module, folder)
        disc = getattr(pl_module, "disc", None)
        if self.save_discriminator and disc is not None:
            path = folder / f"{self.name}.disc.safetensors"
            with atomic_path(path, suffix=".safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()}, str(tmp))
            out.append(path)
        self.written += out
        log.info("exported TAESD: %s", ", ".join(str(p) for p in out))
        return out

    def _write(self, pl_module: pl.LightningModule, folder: Path) -> list[Path]:
        taesd = pl_module.taesd
        out: list[Path] = []
        t = pl_module.config.taesd
        parts = tuple(p for p, on in (("encoder", t.train_encoder), ("decoder", t.train_decoder)) if on)
        meta = {
            # what the latents are: the teacher VAE's latents in the UNet's scale
            "hyperlit.source_scaling_factor": str(pl_module.scaling),
            "hyperlit.source_shift_factor": str(pl_module.shift),
            "hyperlit.step": str(pl_module.step),
        }
        if self.diffusers:
            # the folder holds both halves; the metadata says which trained (eval-vae ignores a random encoder)
            folder_meta = {**meta, TRAINED_PARTS: ",".join(parts)}
            out.append(save_diffusers_folder(taesd, folder / "diffusers", self.dtype, folder_meta))
        if self.madebyollin:
            out += save_taesd_files(taesd, folder, self.name, parts, self.dtype, meta)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = int(pl_module.step)
        if self.save_every and step % self.save_every == 0 and step != self._last_exported_step:
            self._last_exported_step = step
            self.export(trainer, pl_module, self.dirpath / f"step-{step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "diverged", None):
            log.error("not exporting the final TAESD: training diverged (%s)", pl_module.diverged)
            return
        self.export(trainer, pl_module, self.dirpath)
