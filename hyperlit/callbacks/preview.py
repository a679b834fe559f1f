"""Preview images while training: the hypernetwork in eval mode, a fixed seed, a diffusers sampler.

Runs on global rank 0 only and uses no collectives, so it cannot deadlock a DDP job. The prompt is encoded with
the same conditioning call as training (``components.condition``) and handed to the family's pipeline (SD or
SDXL) as embeddings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from hyperlit.io import atomic_path
from hyperlit.models.sampling import SampleRequest, sample_image

log = logging.getLogger(__name__)


class PreviewImages(L.Callback):
    def __init__(
        self,
        dirpath: str,
        every: int = 500,
        prompt: str | None = None,
        negative_prompt: str = "",
        steps: int = 20,
        guidance_scale: float = 7.0,
        seed: int = 0,
        resolution: int | None = None,
        at_end: bool = True,
    ) -> None:
        if every < 0:
            raise ValueError(f"callbacks.preview.every: {every} is not allowed; use 0 (off) or more")
        if steps < 1:
            raise ValueError(f"callbacks.preview.steps: {steps} is not allowed; use 1 or more")
        self.dirpath = Path(dirpath)
        self.every = every
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.resolution = resolution
        self.at_end = at_end
        self._last_caption: str | None = None
        self._last_step = -1
        self.written: list[Path] = []

    def _prompt(self) -> str:
        return self.prompt if self.prompt else (self._last_caption or "")

    @torch.no_grad()
    def render(self, pl_module: L.LightningModule, height: int, width: int) -> Image.Image:
        components = pl_module.components
        hn = pl_module.hypernetwork
        was_training = hn.training
        hn.eval()  # dropout off and the configured multiplier, as at inference
        try:
            sampler = DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config)
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            latents = torch.randn((1, components.unet.config.in_channels, height // 8, width // 8), generator=generator)
            request = SampleRequest(
                self._prompt(), self.negative_prompt, height, width, self.steps, self.guidance_scale, latents
            )
            image = sample_image(components, sampler, request)
        finally:
            hn.train(was_training)
        return image

    def _size(self, batch: dict) -> tuple[int, int]:
        if self.resolution:
            return self.resolution, self.resolution
        latents = batch["latents"]
        return latents.shape[-2] * 8, latents.shape[-1] * 8

    def _preview(self, trainer: L.Trainer, pl_module: L.LightningModule, size: tuple[int, int]) -> None:
        step = trainer.global_step
        image = self.render(pl_module, *size)
        path = self.dirpath / f"{pl_module.hypernetwork.name}-{step}.png"
        with atomic_path(path, suffix=".png") as tmp:
            image.save(tmp, format="PNG")
        self.written.append(path)
        _log_image(trainer, image, self._prompt(), step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        captions = batch.get("caption")
        if captions:
            self._last_caption = captions[0]
        self._size_seen = self._size(batch)
        step = trainer.global_step
        if not self.every or step == 0 or step % self.every or step == self._last_step:
            return
        self._last_step = step
        if trainer.is_global_zero:
            self._preview(trainer, pl_module, self._size_seen)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        size = getattr(self, "_size_seen", None)
        if self.at_end and size and trainer.is_global_zero and trainer.global_step != self._last_step:
            self._preview(trainer, pl_module, size)


def _log_image(trainer: L.Trainer, image: Image.Image, caption: str, step: int) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="preview", images=[image], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("preview", np.asarray(image), step, dataformats="HWC")
