"""#26 part 5: a run says when nothing is being learned. preview/change is the mean |pixel difference| between the
multiplier-0 and multiplier-1 preview images; under callbacks.preview.min_change (calibrated in
docs/benchmarks.md) from half-way through the run, one warning names the settings to raise."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from hyperlit.callbacks.change import pixel_change, preview_change
from hyperlit.callbacks.preview import PreviewImages
from hyperlit.runner import build_run, fit

WARNING = "nothing is being learned"
# What a grid costs here: one prompt, multipliers 0 and 1 only, at the default 20 sampling steps (the level is
# calibrated at 20 steps: fewer steps change the images less).
PREVIEW = (
    "callbacks.preview.steps=20",
    "callbacks.preview.prompts=['a red circle']",
    "callbacks.preview.multipliers=[0,1]",
)


def test_pixel_change_is_the_mean_absolute_difference_in_8_bit_levels() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expected = sum(abs(int(x) - int(y)) for x, y in zip(a.ravel(), b.ravel(), strict=True)) / a.size
    assert pixel_change(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(expected, abs=1e-12)
    white, black = Image.new("RGB", (4, 4), "white"), Image.new("RGB", (4, 4), "black")
    assert preview_change([white, white], [black, white]) == 127.5


def run_and_warnings(train_cfg, caplog, *overrides: str, steps: int):
    cfg = train_cfg(*PREVIEW, *overrides, steps=steps)
    built = build_run(cfg)
    with caplog.at_level(logging.INFO):
        fit(built, cfg)
    preview = next(cb for cb in built.trainer.callbacks if isinstance(cb, PreviewImages))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]
    return preview, warnings


def test_a_1e5_run_of_300_steps_is_told_once_what_to_raise(train_cfg, caplog) -> None:
    # The fallback every folder got before #26: 1e-5 for 300 steps (here batches of 1 to keep the test short).
    preview, warnings = run_and_warnings(
        train_cfg, caplog, "train.learning_rate=1e-5", "data.batch_size=1", "callbacks.preview.every=150",
        "callbacks.validation.every=0", steps=300,
    )  # fmt: skip
    assert sorted(preview.changes) == [0, 150, 300]
    level = preview.min_change
    assert level is not None and all(change < level for change in preview.changes.values())
    assert len(warnings) == 1  # at step 150 (half-way), not again at 300
    assert warnings[0].startswith(f"{WARNING}: at step 150 the network changes the preview by ")
    assert "raise train.learning_rate (now 1e-05) or train.max_steps (now 300)" in warnings[0]
    assert f"{preview.changes[150]:.2f} of 255" in warnings[0] and "val/loss" in warnings[0]
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("summary: preview/change")]
    assert summary and summary[0].endswith(f"(below callbacks.preview.min_change={level:g}: nothing learned)")


def test_a_run_that_learns_is_not_warned(train_cfg, caplog) -> None:
    # The default run learns over 2000 steps (change 37 from step 250 on, docs/benchmarks.md); five times its
    # learning rate gets a test-sized run over the level in 40 steps.
    preview, warnings = run_and_warnings(
        train_cfg, caplog, "train.learning_rate=1e-2", "callbacks.preview.every=0", "callbacks.validation.every=0",
        steps=40,
    )  # fmt: skip
    assert sorted(preview.changes) == [40]
    assert preview.changes[40] >= preview.min_change and warnings == []
