"""How much the hypernetwork changes what the model draws (``preview/change``), and the one-line warning when a run
has learned (nearly) nothing: the figure behind issue #26's "say when nothing is being learned"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def pixel_change(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two same-size images, in 8-bit levels (0 = identical, 255 = black vs white)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    return float(np.abs(x - y).mean())


def preview_change(without: Sequence[Image.Image], with_network: Sequence[Image.Image]) -> float:
    """The mean over prompts of the pixel change between multiplier 0 and multiplier 1 (same seed per prompt)."""
    return float(np.mean([pixel_change(a, b) for a, b in zip(without, with_network, strict=True)]))


def val_text(now: float | None, start: float | None) -> str:
    if now is None:
        return "val/loss not computed (no held-out images)"
    return f"val/loss {now:.4g}" + (f" (step 0: {start:.4g})" if start is not None else "")


def nothing_learned(
    change: float, level: float, step: int, learning_rate: float | str, max_steps: int, val: str
) -> str:
    """The warning line: what was measured, against what, and the two settings to raise."""
    return (
        f"nothing is being learned: at step {step} the network changes the preview by {change:.2f} of 255 levels "
        f"(below callbacks.preview.min_change={level:g}), {val}; raise train.learning_rate (now {learning_rate}) "
        f"or train.max_steps (now {max_steps})"
    )
