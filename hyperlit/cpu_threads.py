"""How many intra-op threads torch uses when a run trains on the CPU (``cpu_threads`` in the top-level configs).

torch starts one OpenMP thread per core, and every op of a small model is a parallel region whose threads wait for
each other at its end. On a machine where another process holds a core, the waiting thread sits out whole
scheduler slices at every op: the tiny demo measured far slower at 2 threads than at 1 next to a busy process
(benchmarks/demo_under_load.py, docs/benchmarks.md "Speed when the machine is busy"). A small model on the CPU
therefore gets 1 thread unless the user says otherwise; a real model's ops are large enough to keep every core.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Model families whose ops are too small for a second thread to pay for its waits (hyperlit.models.FAMILIES).
SMALL_FAMILIES = ("tiny", "tiny_sdxl")
SMALL_MODEL_THREADS = 1


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a run uses and why (``threads`` None: torch's own default is kept)."""

    threads: int | None
    reason: str


def check_cpu_threads(value: Any) -> int | None:
    """``cpu_threads``: "auto" (None) or a whole number >= 1."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"cpu_threads: {value!r} is not allowed; use auto or a whole number >= 1")
    return value


def runs_on_cpu(trainer_cfg: Any) -> bool:
    """Whether the Trainer this config builds trains on the CPU (accelerator cpu, or auto without a GPU)."""
    accelerator = str((trainer_cfg or {}).get("accelerator", "auto") or "auto")
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def choose_threads(setting: Any, on_cpu: bool, family: str | None, env: dict[str, str] | None = None) -> ThreadChoice:
    """The intra-op thread count for a run: the user's number, else 1 for a small model on the CPU."""
    env = os.environ if env is None else env
    chosen = check_cpu_threads(setting)
    if chosen is not None:
        return ThreadChoice(chosen, "cpu_threads")
    if not on_cpu:
        return ThreadChoice(None, "not on the CPU")
    if env.get("OMP_NUM_THREADS"):
        return ThreadChoice(None, "OMP_NUM_THREADS is set")  # the user's own choice for this shell
    if family in SMALL_FAMILIES:
        return ThreadChoice(SMALL_MODEL_THREADS, f"model.family={family} is small")
    return ThreadChoice(None, f"model.family={family}: torch's default")


def apply_threads(choice: ThreadChoice) -> None:
    """Set torch's intra-op threads for this process when the choice names a count."""
    if choice.threads is None or choice.threads == torch.get_num_threads():
        return
    torch.set_num_threads(choice.threads)
    log.info("cpu_threads: %d intra-op thread(s) (%s; cpu_threads=N to change)", choice.threads, choice.reason)
