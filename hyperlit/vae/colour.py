"""Colour statistics of reconstructions against their inputs, and the "grey images" warning.

A damaged or mismatched VAE decodes to washed-out, desaturated or tinted images. The statistics here are
pooled over every pixel of every image (images in [0, 1]): per-channel mean and standard deviation, mean HSV
saturation ((max - min) / max per pixel) and contrast (standard deviation of Rec. 601 luma).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ColourLimits:
    """When a reconstruction's colours count as damaged (ratios are reconstruction / input)."""

    min_saturation_ratio: float = 0.85  # below: the decoder desaturates (the "grey images" symptom)
    max_saturation_ratio: float = 1.20  # above: it over-saturates (e.g. a decoder trained at too small crops)
    min_contrast_ratio: float = 0.85  # below: it flattens contrast (washed out)
    max_mean_shift: float = 0.04  # largest |channel mean difference| in [0, 1] units (about 10 of 255 levels)


@dataclass(frozen=True)
class ColourStats:
    mean: tuple[float, float, float]  # R, G, B in [0, 1]
    std: tuple[float, float, float]
    saturation: float
    contrast: float


@dataclass(frozen=True)
class ColourCheck:
    input: ColourStats
    output: ColourStats
    saturation_ratio: float
    contrast_ratio: float
    mean_shift: tuple[float, float, float]  # output - input, per channel
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ColourAccumulator:
    """Running sums over batches, so a large evaluation set never has to be held at once."""

    def __init__(self) -> None:
        self.pixels = 0
        self.sum = torch.zeros(3, dtype=torch.float64)
        self.sq = torch.zeros(3, dtype=torch.float64)
        self.sat = 0.0
        self.luma = 0.0
        self.luma_sq = 0.0

    def update(self, images: Tensor) -> None:
        """``images``: N×3×H×W in [0, 1] (or uint8)."""
        x = images.double() / 255.0 if images.dtype == torch.uint8 else images.double().clamp(0, 1)
        self.pixels += x.shape[0] * x.shape[2] * x.shape[3]
        self.sum += x.sum(dim=(0, 2, 3))
        self.sq += (x * x).sum(dim=(0, 2, 3))
        hi, lo = x.amax(dim=1), x.amin(dim=1)
        self.sat += float(torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi)).sum())
        luma = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA, dtype=torch.float64))
        self.luma += float(luma.sum())
        self.luma_sq += float((luma * luma).sum())

    def result(self) -> ColourStats:
        if self.pixels == 0:
            raise ValueError("no images were given to the colour statistics")
        n = self.pixels
        mean = self.sum / n
        std = (self.sq / n - mean * mean).clamp_min(0).sqrt()
        luma_mean = self.luma / n
        contrast = max(self.luma_sq / n - luma_mean * luma_mean, 0.0) ** 0.5
        return ColourStats(
            mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in std),  # type: ignore[arg-type]
            saturation=self.sat / n,
            contrast=contrast,
        )


def colour_stats(images: Tensor) -> ColourStats:
    acc = ColourAccumulator()
    acc.update(images)
    return acc.result()


def _ratio(out: float, inp: float) -> float:
    return out / inp if inp > 1e-12 else (1.0 if out <= 1e-12 else float("inf"))


def compare_colours(inputs: ColourStats, outputs: ColourStats, limits: ColourLimits | None = None) -> ColourCheck:
    """Ratios and shifts of ``outputs`` against ``inputs``, with one warning per limit crossed."""
    limits = limits or ColourLimits()
    sat = _ratio(outputs.saturation, inputs.saturation)
    con = _ratio(outputs.contrast, inputs.contrast)
    shift = tuple(o - i for o, i in zip(outputs.mean, inputs.mean, strict=True))
    warnings = []
    if sat < limits.min_saturation_ratio:
        warnings.append(f"desaturates: saturation x{sat:.2f} of the input's (limit {limits.min_saturation_ratio})")
    if sat > limits.max_saturation_ratio:
        warnings.append(f"over-saturates: saturation x{sat:.2f} of the input's (limit {limits.max_saturation_ratio})")
    if con < limits.min_contrast_ratio:
        warnings.append(f"loses contrast: contrast x{con:.2f} of the input's (limit {limits.min_contrast_ratio})")
    worst = max(range(3), key=lambda c: abs(shift[c]))
    if abs(shift[worst]) > limits.max_mean_shift:
        warnings.append(
            f"shifts colour: {'RGB'[worst]} mean {shift[worst]:+.3f} (limit ±{limits.max_mean_shift}, in [0, 1] units)"
        )
    return ColourCheck(inputs, outputs, sat, con, shift, warnings)  # type: ignore[arg-type]
