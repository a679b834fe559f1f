"""Learning rates: A1111's schedule strings and the usual warmup + decay schedules.

A1111's string syntax has no library implementation, so it is written here. Its semantics: ``"5e-5:100, 5e-6:1500"``
means rate 5e-5 while the optimizer step is < 100, then 5e-6 while < 1500, and training *stops* when the list is
exhausted. A bare rate (or step -1) lasts until max steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

SCHEDULER_NAMES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup")


@dataclass(frozen=True)
class A1111Schedule:
    """Segments ``(rate, until_step)``: the rate applies while ``step < until_step``."""

    segments: tuple[tuple[float, int], ...]
    text: str

    @classmethod
    def parse(cls, text: str, max_steps: int, key: str = "train.learning_rate") -> A1111Schedule:
        segments: list[tuple[float, int]] = []
        for item in str(text).split(","):
            parts = [p.strip() for p in item.split(":")]
            if len(parts) > 2 or not parts[0]:
                raise ValueError(
                    f"{key}: {text!r} is not an A1111 schedule; use 'RATE' or 'RATE:UNTIL_STEP, ...', "
                    "e.g. '5e-5:100, 5e-6:1500'"
                )
            try:
                rate = float(parts[0])
                until = int(parts[1]) if len(parts) == 2 else -1
            except ValueError:
                raise ValueError(
                    f"{key}: item {item.strip()!r} of {text!r} is not RATE:UNTIL_STEP (a number and a whole "
                    "step count, e.g. 5e-6:1500)"
                ) from None
            if rate <= 0:
                raise ValueError(f"{key}: rate {rate} in {text!r} is not allowed; rates are > 0")
            if until == -1 or until >= max_steps:
                segments.append((rate, max_steps))  # lasts until max steps and ends the list, as in A1111
                break
            if until <= 0 or (segments and until <= segments[-1][1]):
                raise ValueError(
                    f"{key}: step {until} in {text!r} is not allowed; steps must be positive and increasing "
                    "(or -1 for 'until the end')"
                )
            segments.append((rate, until))
        return cls(tuple(segments), str(text))

    @property
    def total_steps(self) -> int:
        """Training stops here: the end of the last segment."""
        return self.segments[-1][1]

    def rate_at(self, step: int) -> float | None:
        """The rate for optimizer step ``step`` (0-based), or None once the schedule is exhausted."""
        for rate, until in self.segments:
            if step < until:
                return rate
        return None

    def check_resume(self, step: int) -> None:
        if self.rate_at(step) is None:
            raise ValueError(
                f"train.learning_rate: the schedule {self.text!r} ends at step {self.total_steps}, but training "
                f"resumes at step {step}; nothing is left to train (extend the schedule to continue)"
            )


def is_a1111_schedule(value: object) -> bool:
    return isinstance(value, str) and (":" in value or "," in value)


def base_learning_rate(value: float | str, max_steps: int) -> float:
    """The optimizer's initial lr: the number itself, or the first rate of an A1111 string."""
    if is_a1111_schedule(value):
        return A1111Schedule.parse(str(value), max_steps).segments[0][0]
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"train.learning_rate: {value!r} is neither a number nor an A1111 schedule like '5e-5:100, 5e-6:1500'"
        ) from None
    if rate <= 0:
        raise ValueError(f"train.learning_rate: {value!r} is not allowed; it must be > 0")
    return rate


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    learning_rate: float | str,
    scheduler: str,
    warmup_steps: int,
    max_steps: int,
) -> LRScheduler:
    """An LR scheduler stepped once per optimizer step."""
    if is_a1111_schedule(learning_rate):
        if scheduler != "constant" or warmup_steps:
            raise ValueError(
                f"train.lr_scheduler={scheduler!r} / train.lr_warmup_steps={warmup_steps}: an A1111 schedule string "
                "in train.learning_rate sets the rates itself; use lr_scheduler=constant and lr_warmup_steps=0"
            )
        schedule = A1111Schedule.parse(str(learning_rate), max_steps)
        base = schedule.segments[0][0]
        # LambdaLR multiplies the initial lr; past the end the last rate is kept (training stops there anyway).
        return LambdaLR(optimizer, lambda step: (schedule.rate_at(step) or schedule.segments[-1][0]) / base)
    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"train.lr_scheduler: {scheduler!r} is not supported; allowed: {', '.join(SCHEDULER_NAMES)}")
    if warmup_steps < 0:
        raise ValueError(f"train.lr_warmup_steps: {warmup_steps} is not allowed; use 0 or more")
    name = "constant_with_warmup" if scheduler == "constant" and warmup_steps else scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
