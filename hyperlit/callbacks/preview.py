"""Preview grids while training: fixed prompts (rows) x hypernetwork multipliers (columns), one fixed seed.

Every cell starts from the same noise, so a row shows the prompt without the network (multiplier 0) and with it,
and successive grids of a run are comparable. The first grid is drawn at step 0 (the untrained network), then every
``every`` steps and at the end; each is labelled with its prompts and multipliers. At each grid the pixel change
between multiplier 0 and 1 is logged as ``preview/change`` with ``val/loss`` against its step-0 value, and a run
whose change stays under ``min_change`` is told, once, that nothing is being learned. Runs on global rank 0 only
and uses no collectives, so it cannot deadlock a DDP job. The default prompts are the captions of the held-out
images (``data.val_count``); without those, the first caption the run trains on. With ``decoder`` (a TAESD, as in
A1111's live preview) the cells are the tiny decoder's images of the sampled latents instead of the VAE's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from diffusers import AutoencoderTiny
from PIL import Image
from torch import Tensor

from hyperlit.callbacks.change import nothing_learned, preview_change, val_text
from hyperlit.callbacks.ema import averaged_weights
from hyperlit.callbacks.grid import grid_caption, label_grid, paste_grid
from hyperlit.callbacks.validation import ValidationLoss
from hyperlit.data.paths import resolve_path
from hyperlit.io import atomic_path
from hyperlit.models import SDComponents
from hyperlit.sampling import SampleSettings, check_sampler, check_size, make_pipeline, sample_image
from hyperlit.vae.taesd_read import WHAT as TAESD_WHAT
from hyperlit.vae.taesd_read import TAESDSource, find_taesd, load_taesd

log = logging.getLogger(__name__)
DECODER_KEY = "callbacks.preview.decoder"

__all__ = ["PreviewImages", "grid_caption", "paste_grid"]
CHANGE = "preview/change"


class PreviewImages(L.Callback):
    def __init__(
        self,
        dirpath: str,
        every: int = 500,
        prompts: Sequence[str] | None = None,
        multipliers: Sequence[float] = (0.0, 0.5, 1.0),
        negative_prompt: str = "",
        steps: int = 20,
        guidance_scale: float = 7.0,
        sampler: str = "dpmpp_2m",
        seed: int = 0,
        resolution: int | None = None,
        at_end: bool = True,
        labels: bool = True,
        min_change: float | None = None,
        decoder: str | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"callbacks.preview.every: {every!r} is not allowed; use 0 (off) or more")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"callbacks.preview.steps: {steps!r} is not allowed; use 1 or more")
        if prompts is not None and (isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"callbacks.preview.prompts: {prompts!r} is not allowed; use a list of prompts or null")
        multipliers = list(multipliers or ())
        if not multipliers or not all(isinstance(m, int | float) and not isinstance(m, bool) for m in multipliers):
            raise ValueError(
                f"callbacks.preview.multipliers: {multipliers!r} is not allowed; use a non-empty list of numbers"
            )
        if min_change is not None and (
            isinstance(min_change, bool) or not isinstance(min_change, int | float) or min_change < 0
        ):
            raise ValueError(
                f"callbacks.preview.min_change: {min_change!r} is not allowed; use a number >= 0 or null (no check)"
            )
        check_sampler(sampler, "callbacks.preview.sampler")
        if resolution is not None:
            check_size(resolution, "callbacks.preview.resolution", 8)
        self.dirpath = Path(dirpath)
        self.every = every
        self.prompts = list(prompts) if prompts else None
        self.multipliers = [float(m) for m in multipliers]
        self.negative_prompt = negative_prompt
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.sampler = sampler
        self.seed = seed
        self.resolution = resolution
        self.at_end = at_end
        self.labels = labels
        self.min_change = None if min_change is None else float(min_change)
        self.decoder = preview_decoder(decoder)  # checked here, at the door; read at the first grid
        self._tiny: AutoencoderTiny | None = None
        self._first_caption: str | None = None
        self._last_step = -1
        self.written: list[Path] = []
        self.changes: dict[int, float] = {}  # step -> preview/change
        self.warned = False

    def grid_prompts(self, trainer: L.Trainer | None) -> list[str]:
        if self.prompts:
            return self.prompts
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        held = [h.caption for h in getattr(datamodule, "held_out", None) or []]
        if held:
            return held
        return [self._first_caption or ""]

    def settings(self, pl_module: L.LightningModule) -> SampleSettings:
        components = pl_module.components
        size = self.resolution or components.family.native_resolution(components.prediction_type)
        return SampleSettings(self.steps, self.guidance_scale, self.sampler, size, size)

    def latent_decoder(self, components: SDComponents) -> Callable[[Tensor], Tensor] | None:
        """UNet-scale latents -> images in [-1, 1] by the tiny decoder (read once, on the UNet's device); None:
        the model's own VAE decodes."""
        if self.decoder is None:
            return None
        if self._tiny is None:
            channels = int(components.vae.config.latent_channels)
            if channels != self.decoder.latent_channels:
                raise ValueError(
                    f"{DECODER_KEY}={str(self.decoder.path)!r}: a TAESD for {self.decoder.latent_channels} latent "
                    f"channels, but this model's VAE has {channels}; use the model family's TAESD or null"
                )
            self._tiny = load_taesd(self.decoder, DECODER_KEY)
        device = components.unet.device
        tiny = self._tiny.to(device)
        return lambda z: tiny.decode(z.to(device, torch.float32)).sample

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a TAESD that does not fit the model fails before the first step, not at the first grid
        if self.decoder is not None and trainer.is_global_zero:
            self.latent_decoder(pl_module.components)

    @torch.no_grad()
    def render(
        self, pl_module: L.LightningModule, prompts: Sequence[str], multipliers: Sequence[float] | None = None
    ) -> list[list[Image.Image]]:
        """cells[row][column]: prompt `row` at multiplier `column` (default: the grid's), all from the same seed."""
        components, hn = pl_module.components, pl_module.hypernetwork
        settings = self.settings(pl_module)
        pipe = make_pipeline(components, self.sampler)
        decode = self.latent_decoder(components)
        was_training, multiplier = hn.training, hn.multiplier
        hn.eval()  # dropout off; the multiplier below is the one applied
        try:
            cells = []
            for prompt in prompts:
                row = []
                for m in self.multipliers if multipliers is None else multipliers:
                    hn.multiplier = m
                    image = sample_image(pipe, components, prompt, self.negative_prompt, self.seed, settings, decode)
                    row.append(image)
                cells.append(row)
        finally:
            hn.multiplier = multiplier
            hn.train(was_training)
        return cells

    def change(self, pl_module: L.LightningModule, prompts: Sequence[str], cells: list[list[Image.Image]]) -> float:
        """preview/change: multiplier 0 against 1, from the grid's cells or, for columns it lacks, fresh renders."""
        columns = []
        for m in (0.0, 1.0):
            if m in self.multipliers:
                columns.append([row[self.multipliers.index(m)] for row in cells])
            else:
                columns.append([row[0] for row in self.render(pl_module, prompts, [m])])
        return preview_change(columns[0], columns[1])

    def _preview(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        self._last_step = step
        prompts = self.grid_prompts(trainer)
        started = time.perf_counter()
        with averaged_weights(trainer, pl_module):  # what the exports hold
            cells = self.render(pl_module, prompts)
            change = self.change(pl_module, prompts, cells)
        grid = label_grid(cells, prompts, self.multipliers) if self.labels else paste_grid(cells)
        path = self.dirpath / f"{pl_module.hypernetwork.name}-{step}.png"
        with atomic_path(path, suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
        self.written.append(path)
        self.changes[step] = change
        _log_image(trainer, grid, grid_caption(prompts, self.multipliers), step)
        for logger in trainer.loggers:
            logger.log_metrics({CHANGE: change}, step=step)
        val = self.val_line(trainer, step)
        log.info(
            "preview: grid %s in %.1f s%s; change %.2f of 255 (multiplier 0 vs 1), %s",
            path, time.perf_counter() - started, " (TAESD decodes)" if self.decoder else "", change, val,
        )  # fmt: skip
        self.check_learning(trainer, pl_module, step, change, val)

    @staticmethod
    def val_line(trainer: L.Trainer, step: int) -> str:
        validation = next((cb for cb in trainer.callbacks if isinstance(cb, ValidationLoss)), None)
        scores = validation.scores if validation is not None else {}
        return val_text(scores.get(step), scores.get(0) if step else None)

    def check_learning(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, change: float, val: str
    ) -> bool:
        """Warn once when, from half-way through the run on, the network still barely changes the preview."""
        max_steps = int(trainer.max_steps or 0)
        if self.warned or self.min_change is None or step == 0 or (max_steps > 0 and 2 * step < max_steps):
            return False
        if change >= self.min_change:
            return False
        self.warned = True
        rate = getattr(pl_module, "learning_rate", "?")
        log.warning(nothing_learned(change, self.min_change, step, rate, max_steps, val))
        return True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Before the batch: the weights after `global_step` optimizer steps (step 0: the untrained network), after
        # the validation callback has scored them when it comes first in the config, so the log line can show it.
        captions = batch.get("caption") if isinstance(batch, dict) else None
        if captions and self._first_caption is None:
            self._first_caption = captions[0]
        step = trainer.global_step
        if not self.every or step % self.every or step == self._last_step:
            return
        if trainer.is_global_zero:
            self._preview(trainer, pl_module)
        self._last_step = step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        due = self.at_end or (self.every and step % self.every == 0)
        if due and trainer.is_global_zero and step != self._last_step:
            self._preview(trainer, pl_module)
        self._last_step = step


def preview_decoder(value: str | None) -> TAESDSource | None:
    """``callbacks.preview.decoder``: the tiny autoencoder it names (checked from its files, no model built)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{DECODER_KEY}: {value!r} is not allowed; use null (the model's VAE) or a path: {TAESD_WHAT}")
    found = find_taesd(resolve_path(value, DECODER_KEY, TAESD_WHAT), DECODER_KEY)
    if found is None:
        raise ValueError(
            f"{DECODER_KEY}={value!r}: not a tiny autoencoder; use {TAESD_WHAT}, or null (the model's VAE)"
        )
    return found


def _log_image(trainer: L.Trainer, image: Image.Image, caption: str, step: int) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="preview", images=[image], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("preview", np.asarray(image), step, dataformats="HWC")
            logger.experiment.add_text("preview/caption", caption, step)
