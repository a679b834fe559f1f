"""Lightning + data overhead: the hypernetwork task's step under Lightning vs a hand-written loop, tiny model.

    python benchmarks/lightning_loop.py --steps 20 --rounds 3

Lightning arm: `python train.py` for the embedded default (tiny model, datasets/sample, caches warm), with the
callbacks that do extra work off (previews, exports, checkpoints, progress bar, loggers); timed from the end of a
warm-up step to the end of the last step, so data loading, the loop, logging and the task's hooks are all in.
Hand-written arm: the same HypernetworkTask.compute_loss, backward, AdamW step and LR schedule in a plain loop over
batches already in memory. Arms alternate (rounds); the best per-step time of each is compared.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from hyperlit.runner import build_run, fit  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
WARMUP = 2


class StepClock(pl.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps += 1
        if self.steps == WARMUP:
            self.start = time.perf_counter()
        self.end = time.perf_counter()

    def seconds_per_step(self) -> float:
        assert self.start is not None and self.end is not None
        return (self.end - self.start) / (self.steps - WARMUP)


def config(out: Path, steps: int) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train",
            [
                f"paths.output_dir={out}",
                f"data.cache_dir={out.parent / 'cache'}",  # shared by every round: warm after the first
                f"train.max_steps={steps}",
                "logger=none",
                "~callbacks.progress",
                "~callbacks.checkpoint",
                "trainer.enable_progress_bar=false",
                "callbacks.preview.every=0",
                "callbacks.preview.at_end=false",
                "callbacks.export.save_every=0",
                "callbacks.export.safetensors=false",
            ],
        )


def lightning_step(out: Path, steps: int) -> float:
    cfg = config(out, steps)
    run = build_run(cfg)
    clock = StepClock()
    run.trainer.callbacks.append(clock)
    fit(run, cfg)
    return clock.seconds_per_step()


def hand_step(out: Path, steps: int) -> float:
    cfg = config(out, steps)
    run = build_run(cfg)  # the same parts: task module, data module, optimizer factory
    task, datamodule = run.module, run.parts.datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches: list[dict] = []
    while len(batches) < steps:  # in memory before timing: the hand loop has no data cost at all
        batches.extend(datamodule.train_dataloader())
    task.on_fit_start()
    task.hypernetwork.train()
    optimizers = task.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    start = 0.0
    for i, batch in enumerate(batches[:steps]):
        if i == WARMUP:
            start = time.perf_counter()
        loss = task.compute_loss(batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = (time.perf_counter() - start) / (steps - WARMUP)
    task.on_fit_end()
    return seconds


def loop_overhead(steps: int = 20, rounds: int = 3) -> float:
    """Best Lightning s/step over best hand-written s/step (prints both)."""
    torch.manual_seed(0)
    results: dict[str, list[float]] = {"lightning": [], "hand": []}
    with tempfile.TemporaryDirectory() as tmp:
        lightning_step(Path(tmp) / "fill-cache", WARMUP + 1)
        for r in range(rounds):
            results["lightning"].append(lightning_step(Path(tmp) / f"l{r}", steps))
            results["hand"].append(hand_step(Path(tmp) / f"h{r}", steps))
    best = {arm: min(times) for arm, times in results.items()}
    print(f"\ntraining loop, tiny model, {steps} steps x {rounds} rounds (best s/step): Lightning "
          f"{best['lightning'] * 1e3:.1f} ms, hand-written {best['hand'] * 1e3:.1f} ms, ratio "
          f"{best['lightning'] / best['hand']:.3f}")  # fmt: skip
    return best["lightning"] / best["hand"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ratio = loop_overhead(args.steps, args.rounds)
    print(f"goal: Lightning + data overhead <= 5%: {'met' if ratio <= 1.05 else 'MISSED'} ({(ratio - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
