"""Run the frozen encoders on the training device while caching (prepare_data runs before Lightning moves
the model), then put them back where they were."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def encoders_on(encoder: Any, trainer: Any) -> Iterator[None]:
    device = getattr(getattr(trainer, "strategy", None), "root_device", None) if trainer is not None else None
    moved: list[tuple[torch.nn.Module, torch.device]] = []
    if isinstance(device, torch.device) and device.type != "cpu":
        for attr in ("vae", "text_encoder"):
            module = getattr(encoder, attr, None)
            if isinstance(module, torch.nn.Module):
                param = next(module.parameters(), None)
                if param is not None and param.device != device:
                    moved.append((module, param.device))
                    module.to(device)
    try:
        yield
    finally:
        for module, original in moved:
            module.to(original)
