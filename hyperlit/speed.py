"""Speed and memory options for the frozen UNet: block checkpointing, torch.compile, CUDA memory format.

None of these change what is computed: checkpointed blocks recompute exactly their forward, the compiled UNet
runs the same graph, channels_last only changes the memory layout.
"""

from __future__ import annotations

import logging
import time
import weakref
from types import TracebackType
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "FirstCallTimer",
    "compile_unet",
    "enable_gradient_checkpointing",
    "use_channels_last",
    "warn_compile_on_cpu",
]


def _checkpoint_block(block: nn.Module, *args: Any) -> Any:
    # Non-reentrant on purpose: the reentrant variant only tracks gradients through tensor *arguments*, and with a
    # frozen UNet none requires grad (only hypernetwork parameters do, which are not block arguments), so it would
    # silently return no gradients. The non-reentrant one records the graph as usual and, in backward, re-runs the
    # block with the very same arguments, so the cross_attention_kwargs carrying the shared text-context K/V
    # (computed once, outside every block) are reused, not recomputed.
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Checkpoint every ResNet and transformer block of a diffusers UNet (what A1111 does for hypernetworks).

    diffusers checkpoints whenever grad mode is on, in eval mode too (the frozen UNet stays in eval), and never
    under no_grad (previews cost nothing extra).
    """
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_block)


_COMPILED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def compile_unet(unet: nn.Module, **options: Any) -> bool:
    """torch.compile the UNet in place (its __call__, hooks included), so every holder of the object gets it.

    The hypernetwork processor and the text-context pre-hook trace without graph breaks: the pre-hook and the
    UNet forward are two graphs (see tests/test_speed.py). Returns False if the UNet was compiled already (a second
    fit on the same model keeps the compiled code).
    """
    if unet in _COMPILED:
        return False
    unet.compile(**options)
    _COMPILED.add(unet)
    return True


def warn_compile_on_cpu(device: torch.device) -> bool:
    """Say so when train.compile runs on the CPU, where inductor's code measured slower than eager."""
    if device.type != "cpu":
        return False
    # benchmarks/hn_step.py, SD1.5 UNet, 256 px, fp32, 2 cores: 6.67 s/step compiled vs 3.18 eager (the narrow
    # --small UNet: 0.93x). A user who turns it on expects speed; on a CPU they get the opposite plus the compile.
    log.warning(
        "train.compile=true on the CPU: inductor's code ran the SD1.5 training step 2.1x slower than eager at 256 px "
        "(docs/benchmarks.md), after minutes of compiling; it is meant for CUDA GPUs (train.compile=false to skip)"
    )
    return True


def use_channels_last(unet: nn.Module, device: torch.device) -> bool:
    """channels_last for the UNet's convolutions on CUDA (faster cuDNN kernels); on CPU nothing changes."""
    if device.type != "cuda":
        return False
    unet.to(memory_format=torch.channels_last)
    return True


class FirstCallTimer:
    """Logs, once, how long the first call in its `with` block took (for torch.compile: compilation included)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.seconds: float | None = None
        self._start: float | None = None

    def __enter__(self) -> FirstCallTimer:
        if self.seconds is None:
            self._start = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.seconds is None and self._start is not None and exc_type is None:
            self.seconds = time.perf_counter() - self._start
            log.info("torch.compile: the first %s took %.1f s (compilation included)", self.what, self.seconds)
        self._start = None
