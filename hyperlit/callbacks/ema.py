"""Exponential moving average of a module's trainable weights, as a Lightning callback.

The tracked parameters come from ``pl_module.ema_parameters()`` (name -> parameter) when the module has it,
else every parameter with ``requires_grad``. The average is updated only after a real optimizer update of
those weights: when the module exposes ``ema_should_update`` it decides (the VAE task sets it after a G step,
so D steps and skipped NaN steps never count), otherwise an increase of ``trainer.global_step`` does.
The shadow weights are fp32, live in the checkpoint (callback state) and are swapped in for validation.
Both tasks use it: the VAE task always (Stability's VAE releases are EMA weights); the hypernetwork task when
``callbacks.ema.enabled`` (A1111 exports the raw weights), and then its exports, previews and val/loss all see the
averaged weights (:func:`averaged_weights`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import lightning.pytorch as pl
import torch
from torch import Tensor, nn


class EMA(pl.Callback):
    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        start_step: int = 0,
        update_every: int = 1,
        validate_with_ema: bool = True,
        enabled: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be in [0, 1)")
        if update_every < 1:
            raise ValueError(f"ema.update_every={update_every} must be >= 1")
        self.decay = decay
        self.warmup = warmup
        self.start_step = start_step
        self.update_every = update_every
        self.validate_with_ema = validate_with_ema
        self.enabled = enabled  # off: the callback does nothing and find() does not return it
        self.shadow: dict[str, Tensor] = {}
        self.num_updates = 0  # EMA updates applied
        self.seen_updates = 0  # eligible optimizer updates seen (for start_step / update_every)
        self._last_global_step = 0
        self._backup: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def find(trainer: pl.Trainer) -> EMA | None:
        return next((c for c in trainer.callbacks if isinstance(c, EMA) and c.enabled), None)

    @staticmethod
    def _params(pl_module: nn.Module) -> dict[str, nn.Parameter]:
        fn = getattr(pl_module, "ema_parameters", None)
        if callable(fn):
            return dict(fn())
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        # (1 + n) / (10 + n) warm-up (LitEma / diffusers EMAModel): early averages are not dominated by init.
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def _init_shadow(self, pl_module: nn.Module) -> None:
        params = self._params(pl_module)
        if self.shadow:
            missing = set(params) ^ set(self.shadow)
            if missing:
                raise ValueError(f"EMA state does not match the model's trainable weights (e.g. {sorted(missing)[0]})")
            for n, p in params.items():
                self.shadow[n] = self.shadow[n].to(device=p.device, dtype=torch.float32)
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, pl_module: nn.Module) -> None:
        d = self.current_decay()
        for n, p in self._params(pl_module).items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    @contextmanager
    def swapped(self, pl_module: nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into the module (for validation, export, checks)."""
        if not self.shadow or self._backup is not None:  # nothing to swap, or already swapped in
            yield
            return
        params = self._params(pl_module)
        self._backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self._backup[n])
            self._backup = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        self._init_shadow(pl_module)
        self._last_global_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if not self.enabled:
            return
        flag = getattr(pl_module, "ema_should_update", None)
        stepped = bool(flag) if flag is not None else trainer.global_step > self._last_global_step
        self._last_global_step = trainer.global_step
        if not stepped:
            return
        self.seen_updates += 1
        if self.seen_updates > self.start_step and self.seen_updates % self.update_every == 0:
            self.update(pl_module)
        elif self.seen_updates <= self.start_step:  # before start: track the raw weights
            with torch.no_grad():
                for n, p in self._params(pl_module).items():
                    self.shadow[n].copy_(p.detach().float())

    def _swap_in(self, pl_module: nn.Module) -> None:
        if self.enabled and self.validate_with_ema and self.shadow:
            self._cm = self.swapped(pl_module)
            self._cm.__enter__()

    def _swap_out(self) -> None:
        cm = getattr(self, "_cm", None)
        if cm is not None:
            self._cm = None
            cm.__exit__(None, None, None)

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._swap_out()

    def on_exception(self, trainer, pl_module, exception) -> None:  # noqa: ANN001
        self._swap_out()  # never leave averaged weights in the live model

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()},
            "num_updates": self.num_updates,
            "seen_updates": self.seen_updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.shadow = {n: t.float() for n, t in state_dict["shadow"].items()}
        self.num_updates = int(state_dict["num_updates"])
        self.seen_updates = int(state_dict.get("seen_updates", self.num_updates))


def averaged_weights(
    trainer: pl.Trainer, pl_module: nn.Module, validation: bool = False
) -> AbstractContextManager[None]:
    """The run's EMA weights swapped into `pl_module` for the block, when the run keeps an enabled EMA (and, for
    `validation`, validates with it); otherwise the live weights, untouched."""
    ema = EMA.find(trainer)
    if ema is None or (validation and not ema.validate_with_ema):
        return nullcontext()
    return ema.swapped(pl_module)
