"""Validation image panels (input | reconstruction | amplified difference) and logging them to any logger."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def image_panel(x: Tensor, x_hat: Tensor, diff_gain: float = 4.0) -> Tensor:
    """3×(n·H)×(3·W) image in [0, 1]: one row per sample; the difference is |x - x̂| × ``diff_gain``."""
    a = (x.float().clamp(-1, 1) + 1) / 2
    b = (x_hat.float().clamp(-1, 1) + 1) / 2
    d = ((a - b).abs() * diff_gain).clamp(0, 1)
    rows = torch.cat([a, b, d], dim=3)  # n×3×H×3W
    return torch.cat(list(rows), dim=1)


def log_image_panel(loggers: Sequence, key: str, image: Tensor, step: int) -> None:
    """Send a CHW [0, 1] image to every logger that takes images (wandb, tensorboard)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for lg in loggers:
        try:
            if isinstance(lg, WandbLogger):
                lg.log_image(key=key, images=[image.permute(1, 2, 0).numpy()], caption=[f"step {step}"])
            elif isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image(key, image, global_step=step)
        except Exception as e:  # noqa: BLE001 - a logging hiccup must not end a training run
            log.warning("could not log image panel to %s: %s", type(lg).__name__, e)
