"""`train.learning_rate=auto`: a learning-rate range test on the user's data, before training, scored by `val/loss`.

Each candidate rate (log-spaced from `train.lr_auto.min` to `max`) trains a fresh copy of the hypernetwork (the
run's own initial weights) for `steps_per_rate` steps on the same batches with the same noise, timesteps and dropout
masks, and is then scored by `val/loss` at the fixed (timestep, noise) pairs of callbacks/validation.py: a function
of the weights only, so the rates differ in nothing but the rate.

Why not Lightning's `Tuner.lr_find`: it trains one network while the rate grows every step and scores each rate
by that step's training loss. The diffusion loss of one batch swings more with the random timestep than with the
rate, and a rate's effect there is mixed with every earlier rate's; lr_find has no hook for another objective.

The rule (why: docs/benchmarks.md "learning_rate=auto"): the rate with the lowest `val/loss` after the short
training, one sweep step lower (`pick_rate`). A short run rewards the largest rate that has not yet turned
unstable; a run many times longer at that rate ends noisier than one a step below it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw

from hyperlit.attention import hypernetworks_attached
from hyperlit.callbacks.validation import validation_loss
from hyperlit.files.torch_file import load_torch_file
from hyperlit.io import atomic_path
from hyperlit.options import not_allowed
from hyperlit.speed import enable_gradient_checkpointing

log = logging.getLogger(__name__)

AUTO = "auto"
PLOT_NAME = "lr_auto.png"
CHECKPOINT_KEY = "hyperlit_lr_auto"  # the sweep's result in every checkpoint: a resumed run uses its rate
NOT_SCORED = -1.0  # val/loss is never negative: marks rates another rank scored


def is_auto(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


@dataclass(frozen=True)
class LRAutoOptions:
    """`train.lr_auto`: the sweep of a range test (checked here, before any weights load)."""

    min: float = 1e-6
    max: float = 1e-1
    count: int = 11
    steps_per_rate: int = 20

    def __post_init__(self) -> None:
        for key in ("min", "max"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise not_allowed(f"train.lr_auto.{key}", value, "use a rate in (0, 1)")
        if not self.min < self.max:
            raise not_allowed("train.lr_auto.max", self.max, f"use more than train.lr_auto.min ({self.min})")
        for key, least in (("count", 2), ("steps_per_rate", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise not_allowed(f"train.lr_auto.{key}", value, f"use a whole number >= {least}")

    def rates(self) -> list[float]:
        """`count` rates, evenly spaced on a log scale from min to max (both included)."""
        return [float(r) for r in np.geomspace(self.min, self.max, self.count)]


@dataclass(frozen=True)
class RangeTest:
    """The sweep's outcome (the same on every rank)."""

    rates: list[float]
    scores: list[float]  # val/loss after steps_per_rate steps at each rate (inf: the loss diverged)
    start: float  # val/loss of the untrained network
    rate: float  # the pick

    def as_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "rates": self.rates, "scores": self.scores, "start": self.start}


def pick_rate(rates: Sequence[float], scores: Sequence[float]) -> float:
    """One sweep step below the rate with the lowest val/loss (the lowest rate itself when that is the best)."""
    finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
    if not finite:
        raise ValueError(
            f"train.learning_rate=auto: the loss diverged at every rate from {rates[0]:.3g} to {rates[-1]:.3g}; "
            "lower train.lr_auto.min and train.lr_auto.max"
        )
    best = min(finite, key=lambda i: (scores[i], i))
    return float(rates[max(best - 1, 0)])


def stored_range_test(path: str | Path) -> dict[str, Any]:
    """The range test a checkpoint holds (a run resumed with learning_rate=auto keeps its rate; no second sweep)."""
    checkpoint = load_torch_file(path, f"ckpt_path={path}")
    stored = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict) or not isinstance(stored.get("rate"), float):
        raise ValueError(
            f"train.learning_rate: 'auto' cannot resume ckpt_path={path}: it was trained with a fixed rate; "
            "resume with that rate"
        )
    return stored


class LRRangeTest(L.Callback):
    """Runs the range test in `setup` (after the data, before the optimizer is built) and gives the module the rate.

    With several processes each rank scores every world-th rate and the scores are gathered, so every rank picks
    the same rate from the same numbers. Rank 0 logs it, prints one line and writes the curve to `lr_auto.png`.
    """

    def __init__(self, options: LRAutoOptions, timesteps: int = 8, seed: int = 0, dirpath: str = ".") -> None:
        self.options = options
        self.timesteps = timesteps
        self.seed = seed
        self.dirpath = Path(dirpath)
        self.result: RangeTest | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.result is not None:
            return
        datamodule = trainer.datamodule
        held_out = list(getattr(datamodule, "held_out", None) or [])
        if not held_out:
            raise ValueError(
                "train.learning_rate: 'auto' scores each rate by val/loss and this data set holds no image out "
                "(data.val_count=0, or fewer than 4 usable images); give a number instead"
            )
        rates = self.options.rates()
        device = trainer.strategy.root_device
        scores = torch.full((len(rates),), NOT_SCORED, dtype=torch.float64)
        batches = [_to(b, device) for b in datamodule.sweep_batches(self.options.steps_per_rate)]
        start = self._sweep(trainer, pl_module, batches, held_out, rates, scores, device)
        if trainer.world_size > 1:
            gathered = trainer.strategy.all_gather(scores.to(device))
            scores = gathered.reshape(trainer.world_size, -1).max(dim=0).values.cpu()
        values = [float(s) for s in scores.tolist()]
        self.result = RangeTest(rates, values, start, pick_rate(rates, values))
        pl_module.learning_rate = self.result.rate
        pl_module.lr_auto = self.result.as_dict()
        if trainer.is_global_zero:
            plot = write_plot(self.result, self.dirpath / PLOT_NAME)
            log.info(
                "train.learning_rate=auto: %.3g (val/loss %s at %d rates from %.3g to %.3g, %d steps each; curve: %s)",
                self.result.rate, _describe(values), len(rates), rates[0], rates[-1], self.options.steps_per_rate,
                plot,
            )  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics({"lr_auto/rate": self.result.rate}, step=0)

    def _sweep(
        self,
        trainer: L.Trainer,
        module: Any,
        batches: list[dict],
        held_out: list,
        rates: list[float],
        scores: torch.Tensor,
        device: torch.device,
    ) -> float:
        """Trains and scores this rank's share of the rates into `scores`; returns the untrained val/loss."""
        hn = module.hypernetwork
        module.components.to(device)
        hn.to(device)
        initial = {k: v.detach().clone() for k, v in hn.state_dict().items()}
        unet = module.components.unet
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), hypernetworks_attached(unet, [hn]):
            if module.gradient_checkpointing:
                enable_gradient_checkpointing(unet)
            try:
                start = validation_loss(module, held_out, self.timesteps)
                for i in range(trainer.global_rank, len(rates), trainer.world_size):
                    hn.load_state_dict(initial)
                    scores[i] = self._train_and_score(trainer, module, batches, held_out, rates[i], device)
            finally:
                hn.load_state_dict(initial)
                if module.gradient_checkpointing:
                    unet.disable_gradient_checkpointing()
        return start

    def _train_and_score(
        self, trainer: L.Trainer, module: Any, batches: list[dict], held_out: list, rate: float, device: torch.device
    ) -> float:
        hn = module.hypernetwork
        hn.train()
        torch.manual_seed(self.seed)  # the same dropout masks at every rate
        generator = torch.Generator(device).manual_seed(self.seed)  # the same noise and timesteps at every rate
        optimizer = module.optimizer_factory(params=hn.parameters(), lr=rate)
        scaler = torch.amp.GradScaler(device.type) if str(trainer.precision).startswith("16") else None
        clip = trainer.gradient_clip_val
        for batch in batches:
            with trainer.precision_plugin.forward_context():
                loss = module.compute_loss(batch, generator=generator).mean()
            if not torch.isfinite(loss):
                return math.inf
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if clip:
                if trainer.gradient_clip_algorithm == "value":
                    torch.nn.utils.clip_grad_value_(hn.parameters(), float(clip))
                else:
                    torch.nn.utils.clip_grad_norm_(hn.parameters(), float(clip))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        score = validation_loss(module, held_out, self.timesteps)
        return score if math.isfinite(score) else math.inf


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _describe(scores: list[float]) -> str:
    return " ".join("inf" if not math.isfinite(s) else f"{s:.3g}" for s in scores)


def write_plot(result: RangeTest, path: Path, size: tuple[int, int] = (640, 400)) -> Path:
    """val/loss against log10(rate), the untrained val/loss as a grey line, the pick in red (drawn with PIL)."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [math.log10(r) for r in result.rates]
    finite = [s for s in result.scores if math.isfinite(s)] + [result.start]
    # the axis spans the best score to a little above the untrained one: a diverged rate would flatten the rest;
    # points above the top (and inf) sit on the top edge, drawn hollow
    low = min(finite)
    high = min(max(finite), result.start + 1.5 * (result.start - low)) if result.start > low else max(finite)
    pad = (high - low) * 0.08 or 0.01
    low, high = low - pad, high + pad

    def px(x: float, y: float) -> tuple[float, float]:
        fx = (x - xs[0]) / (xs[-1] - xs[0])
        fy = (min(max(y, low), high) - low) / (high - low)
        return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

    d.rectangle((left, top, width - right, height - bottom), outline="black")
    for x in range(math.ceil(xs[0]), math.floor(xs[-1]) + 1):  # a tick per decade
        gx, _ = px(x, low)
        d.line((gx, height - bottom, gx, height - bottom + 5), fill="black")
        d.text((gx - 12, height - bottom + 8), f"1e{x}", fill="black")
    for y in (low + pad, result.start):
        _, gy = px(xs[0], y)
        d.text((4, gy - 6), f"{y:.4g}", fill="black")
    _, sy = px(xs[0], result.start)
    d.line((left, sy, width - right, sy), fill=(160, 160, 160))
    points = [px(x, s if math.isfinite(s) else high) for x, s in zip(xs, result.scores, strict=True)]
    d.line(points, fill=(30, 90, 200), width=2)
    for (x, y), s in zip(points, result.scores, strict=True):
        inside = math.isfinite(s) and s <= high
        d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(30, 90, 200) if inside else "white", outline=(30, 90, 200))
    pick_x, _ = px(math.log10(result.rate), low)
    d.line((pick_x, top, pick_x, height - bottom), fill=(210, 40, 40), width=2)
    d.text(
        (left, 8), f"val/loss after the sweep's steps; picked {result.rate:.3g} (red), untrained (grey)", fill="black"
    )
    d.text((width // 2 - 40, height - 20), "learning rate", fill="black")
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path
