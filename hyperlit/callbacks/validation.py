"""`val/loss`: the diffusion loss of held-out images at fixed (timestep, noise) pairs, a function of the weights only.

Each held-out image is scored at `timesteps` timesteps spread evenly over the training schedule, with noise drawn
from a generator seeded by the image's content key. Nothing depends on the run seed, the global RNG, the step
the run resumed from or how many processes run: every rank scores every held-out image in the same order and
batching, so all ranks compute the same value. The hypernetwork is scored in eval mode (no dropout) at strength 1,
the strength it trains at.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor

from hyperlit.callbacks.ema import averaged_weights
from hyperlit.data.heldout import HeldOut
from hyperlit.models.components import plain_sizes

log = logging.getLogger(__name__)

METRIC = "val/loss"


class ScoresDiffusionLoss(Protocol):
    """What the callback needs from the LightningModule (HypernetworkTask has it)."""

    components: Any
    hypernetwork: torch.nn.Module

    def loss_at(self, latents: Tensor, noise: Tensor, timesteps: Tensor, cond: Any) -> Tensor: ...


def fixed_timesteps(num_train_timesteps: int, count: int) -> Tensor:
    """The centres of `count` equal slices of the schedule, e.g. 1000 steps, 8 -> 62, 187, ..., 937."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()


def fixed_noise(key: str, count: int, shape: Sequence[int]) -> Tensor:
    """`count` noise tensors of `shape` for the image with content key `key`, the same in every run."""
    seed = int.from_bytes(hashlib.sha256(f"val-noise:{key}".encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def validation_loss(module: ScoresDiffusionLoss, held_out: Sequence[HeldOut], timesteps: int) -> float:
    """Mean over images and timesteps of the per-sample MSE to the training target."""
    components = module.components
    hn = module.hypernetwork
    device = components.unet.device
    steps = fixed_timesteps(components.noise_scheduler.config.num_train_timesteps, timesteps).to(device)
    was_training, multiplier = hn.training, hn.multiplier
    hn.eval()
    hn.multiplier = 1.0
    try:
        total = 0.0
        for item in held_out:
            latents = item.latents.to(device).unsqueeze(0).expand(timesteps, *item.latents.shape)
            noise = fixed_noise(item.key, timesteps, item.latents.shape).to(device)
            h, w = (side * components.family.vae_scale_factor for side in item.latents.shape[-2:])
            cond = components.condition([item.prompt] * timesteps, plain_sizes(h, w, timesteps))  # SDXL: + pooled
            per_sample = module.loss_at(latents, noise, steps, cond)
            total += float(per_sample.double().sum())
    finally:
        hn.multiplier = multiplier
        hn.train(was_training)
    return total / (len(held_out) * timesteps)


class ValidationLoss(L.Callback):
    """Scores the held-out data (``trainer.datamodule.held_out``) every `every` optimizer steps, at step 0 and at
    the end; logs ``val/loss`` (progress bar too). Every rank computes it; no collectives, so no deadlock."""

    def __init__(self, every: int = 50, timesteps: int = 8) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(
                f"callbacks.validation.every: {every!r} is not allowed; use 0 (only at start and end) or more"
            )
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"callbacks.validation.timesteps: {timesteps!r} is not allowed; use an integer >= 1")
        self.every = every
        self.timesteps = timesteps
        self.scores: dict[int, float] = {}  # step -> val/loss, for this process
        self._warned = False

    def _held_out(self, trainer: L.Trainer) -> list[HeldOut]:
        held = list(getattr(trainer.datamodule, "held_out", None) or [])
        if not held and not self._warned:
            self._warned = True
            log.warning(
                "validation: no held-out images (data.val_count=0 or a data module without them): val/loss is not "
                "computed and sweeps fall back to train/loss"
            )
        return held

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        step = trainer.global_step
        if step in self.scores:
            return None
        held = self._held_out(trainer)
        if not held:
            return None
        with averaged_weights(trainer, pl_module, validation=True):  # what the exports hold
            value = validation_loss(pl_module, held, self.timesteps)
        self.scores[step] = value
        return value

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Before the batch: the weights after `global_step` optimizer steps, logged at that step (step 0 included).
        step = trainer.global_step
        if step != 0 and (not self.every or step % self.every):
            return
        value = self._score(trainer, pl_module)
        if value is not None:
            # The progress bar and callback_metrics through Lightning; the loggers directly, so the value is
            # recorded at exactly this step whatever trainer.log_every_n_steps says.
            pl_module.log(METRIC, value, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
            _to_loggers(trainer, value)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final weights: no batch follows (no pl_module.log here), so the value is put in callback_metrics
        # by hand, where the runner reads what it returns to sweeps.
        value = self._score(trainer, pl_module)
        if value is not None:
            trainer.callback_metrics[METRIC] = torch.tensor(value, dtype=torch.float64)
            _to_loggers(trainer, value)
            if trainer.is_global_zero:  # the progress bar's last value is the last periodic score, not this one
                first = self.scores.get(0)  # absent in a resumed run
                since = f" (step 0: {first:.4g})" if first is not None else ""
                log.info("validation: val/loss %.4g after %d steps%s", value, trainer.global_step, since)


def _to_loggers(trainer: L.Trainer, value: float) -> None:
    for logger in trainer.loggers:
        logger.log_metrics({METRIC: value}, step=trainer.global_step)
