"""Before the first step: can the base model's VAE hold the user's images? Their round-trip PSNR, a panel, a warning.

A style the autoencoder cannot reproduce cannot be learned: the hypernetwork only ever sees latents, and `val/loss`
still falls while it learns the VAE's distortions. The latents are already cached (encoded once), so the check is
one decode pass of them, compared with the images read again and placed as they were for encoding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch import Tensor

from hyperlit.data.roundtrip import EncodedImage
from hyperlit.io import atomic_path
from hyperlit.options import not_allowed
from hyperlit.vae.metrics import psnr_per_image, to_uint8
from hyperlit.vae.panels import image_panel

log = logging.getLogger(__name__)

METRIC = "data/vae_psnr"
PANEL_NAME = "vae_check.png"
# Identical images have an infinite PSNR; the mean caps each image here so one exact image cannot hide the rest.
PSNR_CAP = 100.0
NOT_SCORED = -1.0  # PSNR is never negative on [0, 1] images: marks images another rank scores, or unreadable


@dataclass(frozen=True)
class RoundTripReport:
    """The check's result on this process (every rank holds the gathered scores)."""

    psnr: list[float]  # dB per checked image, in the data module's order (NaN: unreadable now)
    where: list[str]
    mean: float
    worst: float
    level: float  # the warning level in dB
    warned: bool
    panel: Path | None  # written on global rank 0 only


@torch.no_grad()
def round_trip(components: Any, latents: Tensor) -> Tensor:
    """Decode raw posterior means B×C×h×w through the model's VAE: pixels B×3×H×W in [-1, 1] (not clamped)."""
    return components.decode_latents(components.scale_latents(latents.to(components.vae.device)))


def round_trip_psnr(components: Any, latents: Tensor, pixels: Tensor) -> Tensor:
    """dB per image between `pixels` and their round trip, both as 8-bit images (eval-vae's convention)."""
    decoded = round_trip(components, latents).cpu()
    return psnr_per_image(to_uint8(pixels.cpu()), to_uint8(decoded))


def _check_int(key: str, value: Any, minimum: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise not_allowed(key, value, allowed)
    return value


class VAERoundTripCheck(L.Callback):
    """Scores every image of the data (training and held out) through the VAE before the first step: prints the
    mean / worst PSNR, logs `data/vae_psnr`, writes the worst images next to their round trips, warns once when
    the mean is below `warn_psnr` (null: the model family's level, `ModelFamily.vae_warn_psnr`)."""

    def __init__(
        self,
        enabled: bool = True,
        warn_psnr: float | None = None,
        panel_images: int = 8,
        batch_size: int = 4,
        max_images: int | None = 1000,
        dirpath: str = ".",
    ) -> None:
        key = "callbacks.vae_check."
        if not isinstance(enabled, bool):
            raise not_allowed(key + "enabled", enabled, "use true or false")
        if warn_psnr is not None and (
            isinstance(warn_psnr, bool) or not isinstance(warn_psnr, int | float) or not 0 < warn_psnr < PSNR_CAP
        ):
            raise not_allowed(
                key + "warn_psnr", warn_psnr, f"use null (the model family's level) or dB in (0, {PSNR_CAP:g})"
            )
        self.enabled = enabled
        self.warn_psnr = None if warn_psnr is None else float(warn_psnr)
        self.panel_images = _check_int(key + "panel_images", panel_images, 0, "use 0 (no panel) or more images")
        self.batch_size = _check_int(key + "batch_size", batch_size, 1, "use a whole number >= 1")
        if max_images is not None:
            _check_int(key + "max_images", max_images, 1, "use null (every image) or a whole number >= 1")
        self.max_images = max_images
        self.dirpath = Path(dirpath)
        self.report: RoundTripReport | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.global_step > 0:  # a resumed run reported it when it started
            return
        images_of = getattr(trainer.datamodule, "encoded_images", None)
        if images_of is None:
            log.info("data: the VAE round-trip check reads a folder's images; skipped for streamed data")
            return
        images = _spread(images_of(), self.max_images)
        if not images:
            return
        components = pl_module.components
        max_pixels = trainer.datamodule.opts.max_image_pixels
        scores = self._scores(components, images, max_pixels, trainer.global_rank, trainer.world_size)
        if trainer.world_size > 1:
            # every rank scored its share; the maximum over ranks fills in each image's one real score
            gathered = trainer.strategy.all_gather(scores.to(trainer.strategy.root_device))
            scores = gathered.reshape(trainer.world_size, -1).max(dim=0).values.cpu()
        psnr = [float("nan") if s == NOT_SCORED else float(s) for s in scores.tolist()]
        level = self.warn_psnr if self.warn_psnr is not None else components.family.vae_warn_psnr
        valid = [min(p, PSNR_CAP) for p in psnr if not math.isnan(p)]
        if not valid:
            return
        mean, worst = sum(valid) / len(valid), min(valid)
        panel = None
        if trainer.is_global_zero:
            panel = self._write_panel(components, images, psnr, max_pixels)
            _report(images, psnr, mean, worst, level, panel)
        for logger in trainer.loggers:
            logger.log_metrics({METRIC: mean, f"{METRIC}_worst": worst}, step=trainer.global_step)
        self.report = RoundTripReport(psnr, [i.where for i in images], mean, worst, level, mean < level, panel)

    def _scores(self, components: Any, images: list[EncodedImage], max_pixels: int, rank: int, world: int) -> Tensor:
        """This rank's share (every world-th image) scored in batches of one latent shape; NOT_SCORED elsewhere."""
        scores = torch.full((len(images),), NOT_SCORED, dtype=torch.float64)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i in range(rank, len(images), world):
            by_shape.setdefault(tuple(images[i].latent.shape), []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = [(i, images[i].pixels(max_pixels)) for i in indices[start : start + self.batch_size]]
                chunk = [(i, p) for i, p in chunk if p is not None]
                if not chunk:
                    continue
                latents = torch.stack([images[i].latent for i, _ in chunk])
                values = round_trip_psnr(components, latents, torch.stack([p for _, p in chunk]))
                scores[[i for i, _ in chunk]] = values.double().nan_to_num(posinf=PSNR_CAP)
        return scores

    def _write_panel(
        self, components: Any, images: list[EncodedImage], psnr: list[float], max_pixels: int
    ) -> Path | None:
        """The worst images, one row each: image | round trip | difference x4 (hyperlit.vae.panels)."""
        order = sorted((p, i) for i, p in enumerate(psnr) if not math.isnan(p))[: self.panel_images]
        if not order:
            return None
        rows = []
        for _, i in order:
            pixels = images[i].pixels(max_pixels)
            if pixels is None:
                continue
            decoded = round_trip(components, images[i].latent.unsqueeze(0)).cpu()
            rows.append(image_panel(pixels.unsqueeze(0), decoded))
        if not rows:
            return None
        width = max(r.shape[2] for r in rows)
        canvas = Image.new("RGB", (width, sum(r.shape[1] for r in rows)), (0, 0, 0))
        top = 0
        for row in rows:  # images of different buckets differ in size: rows are pasted, not concatenated
            array = (row.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(array), (0, top))
            top += row.shape[1]
        path = self.dirpath / PANEL_NAME
        with atomic_path(path, suffix=".png") as tmp:
            canvas.save(tmp, format="PNG")
        return path


def _spread(images: list[EncodedImage], limit: int | None) -> list[EncodedImage]:
    """At most `limit` images, evenly spread over the data (a large set needs no full pass to be judged)."""
    if limit is None or len(images) <= limit:
        return images
    return [images[i * len(images) // limit] for i in range(limit)]


def _report(
    images: list[EncodedImage], psnr: list[float], mean: float, worst: float, level: float, panel: Path | None
) -> None:
    where = Path(images[min(range(len(psnr)), key=lambda i: math.inf if math.isnan(psnr[i]) else psnr[i])].where).name
    shown = f"; worst images: {panel}" if panel else ""
    log.info(
        "data: VAE round trip of %d images: PSNR mean %.1f dB, worst %.1f dB (%s)%s", len(images), mean, worst, where,
        shown,
    )  # fmt: skip
    if mean < level:
        log.warning(
            "data: the base model's VAE loses much of these images (round-trip PSNR %.1f dB, below %.1f dB): a look "
            "it cannot reproduce cannot be learned; check in the panel whether your style survives, or set "
            "callbacks.vae_check.warn_psnr",
            mean, level,
        )  # fmt: skip
