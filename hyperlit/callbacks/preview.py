"""Preview grids while training: fixed prompts (rows) x hypernetwork multipliers (columns), one fixed seed.

Every cell starts from the same noise, so a row shows the prompt without the network (multiplier 0) and with it,
and successive grids of a run are comparable. Runs on global rank 0 only and uses no collectives, so it cannot
deadlock a DDP job. The default prompts are the captions of the held-out images (``data.val_count``); without
those, the first caption the run trains on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from hyperlit.callbacks.ema import averaged_weights
from hyperlit.io import atomic_path
from hyperlit.sampling import SampleSettings, check_sampler, check_size, make_pipeline, sample_image

log = logging.getLogger(__name__)


def grid_caption(prompts: Sequence[str], multipliers: Sequence[float]) -> str:
    rows = " | ".join(f"{i + 1}: {p}" for i, p in enumerate(prompts))
    return f"rows (prompts) {rows}; columns: multiplier {', '.join(f'{m:g}' for m in multipliers)}"


def paste_grid(cells: list[list[Image.Image]]) -> Image.Image:
    """Rows of equally sized images as one image."""
    width, height = cells[0][0].size
    grid = Image.new("RGB", (width * len(cells[0]), height * len(cells)))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (c * width, r * height))
    return grid


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
        self._first_caption: str | None = None
        self._last_step = -1
        self.written: list[Path] = []

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

    @torch.no_grad()
    def render(self, pl_module: L.LightningModule, prompts: Sequence[str]) -> list[list[Image.Image]]:
        """cells[row][column]: prompt `row` at multiplier `column`, all from the same seed."""
        components, hn = pl_module.components, pl_module.hypernetwork
        settings = self.settings(pl_module)
        pipe = make_pipeline(components, self.sampler)
        was_training, multiplier = hn.training, hn.multiplier
        hn.eval()  # dropout off; the multiplier below is the one applied
        try:
            cells = []
            for prompt in prompts:
                row = []
                for m in self.multipliers:
                    hn.multiplier = m
                    row.append(sample_image(pipe, components, prompt, self.negative_prompt, self.seed, settings))
                cells.append(row)
        finally:
            hn.multiplier = multiplier
            hn.train(was_training)
        return cells

    def _preview(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        self._last_step = step
        prompts = self.grid_prompts(trainer)
        with averaged_weights(trainer, pl_module):  # what the exports hold
            grid = paste_grid(self.render(pl_module, prompts))
        path = self.dirpath / f"{pl_module.hypernetwork.name}-{step}.png"
        with atomic_path(path, suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
        self.written.append(path)
        _log_image(trainer, grid, grid_caption(prompts, self.multipliers), step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        captions = batch.get("caption")
        if captions and self._first_caption is None:
            self._first_caption = captions[0]
        step = trainer.global_step
        if not self.every or step == 0 or step % self.every or step == self._last_step:
            return
        if trainer.is_global_zero:
            self._preview(trainer, pl_module)
        self._last_step = step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.is_global_zero and trainer.global_step != self._last_step:
            self._preview(trainer, pl_module)


def _log_image(trainer: L.Trainer, image: Image.Image, caption: str, step: int) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="preview", images=[image], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("preview", np.asarray(image), step, dataformats="HWC")
            logger.experiment.add_text("preview/caption", caption, step)
