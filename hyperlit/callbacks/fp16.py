"""fp16 callbacks of the VAE task: fp16_fix's closed-form rescale at fit start, and after training the fp16 decode of
one validation batch with each decoder block's largest activation."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import lightning.pytorch as pl

from hyperlit.callbacks.ema import EMA
from hyperlit.vae.fp16 import FP16_MAX, BlockStat, format_report, fp16_decode_report, fp16_verdict

log = logging.getLogger(__name__)


class Fp16ClosedForm(pl.Callback):
    """``loss.kind=fp16_fix``: rescale the decoder in closed form when fitting starts (see
    :mod:`hyperlit.vae.fp16_rescale`). A task callback, so it runs before the config's callbacks: the EMA copies the
    weights in its own ``on_fit_start`` and must copy the rescaled ones."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.fp16_closed_form(trainer)


class FP16Check(pl.Callback):
    """After training, decode one validation batch in fp16 (EMA weights when an EMA callback is present)."""

    def __init__(self, enabled: bool = True, margin: float = 0.5) -> None:
        self.enabled = enabled
        self.margin = margin  # warn already when a block reaches this fraction of the fp16 maximum
        self.stats: list[BlockStat] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or getattr(pl_module, "diverged", None):
            return
        latents = pl_module.fp16_check_latents(trainer)
        if latents is None:
            log.warning("fp16 check skipped: no validation images")
            return
        ema = EMA.find(trainer)
        with ema.swapped(pl_module) if ema is not None else nullcontext():
            self.stats = fp16_decode_report(pl_module.vae, latents)
        unsafe = [s for s in self.stats if not s.safe or s.max_abs > self.margin * FP16_MAX]
        report = format_report(self.stats)
        if unsafe:
            log.warning(
                "the decoder is NOT fp16-safe (%s): decode it in fp32 (A1111 --no-half-vae, diffusers "
                "force_upcast=True)\n%s",
                ", ".join(s.name for s in unsafe),
                report,
            )
        else:
            verdict = fp16_verdict(self.stats)
            log.info(
                "fp16 decode check passed (fp16 max %.0f; peak %.4g in %s: %s):\n%s",
                FP16_MAX, verdict.peak, verdict.peak_block,
                "well below the fp16 range" if verdict.well_below else "less than 8x headroom", report,
            )  # fmt: skip
