"""Reconstruction metrics on 8-bit images: PSNR and SSIM (torchmetrics), LPIPS (ours), rFID (torchmetrics' Fréchet
distance over our offline InceptionV3)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from hyperlit.vae.inception import FIDInceptionV3
from hyperlit.vae.lpips import LPIPS


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float -> uint8, clamped and rounded as a saved image would be."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def unit(x: Tensor) -> Tensor:
    """uint8 -> float in [0, 1] (the range PSNR/SSIM are reported on, as in the model cards)."""
    return x.float() / 255.0


def psnr_per_image(target: Tensor, pred: Tensor) -> Tensor:
    """dB per image, data range 1; identical images give inf."""
    return peak_signal_noise_ratio(unit(pred), unit(target), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(target: Tensor, pred: Tensor) -> Tensor:
    """Gaussian SSIM (11×11, σ 1.5) per image on [0, 1]; torchmetrics reflect-pads the borders and averages the
    map over every pixel and channel."""
    return structural_similarity_index_measure(unit(pred), unit(target), data_range=1.0, reduction="none")


def lpips_per_image(lpips: LPIPS, target: Tensor, pred: Tensor) -> Tensor:
    return lpips(unit(pred) * 2 - 1, unit(target) * 2 - 1)


class RFID:
    """rFID of several models against one set of real images: the real features are computed once."""

    def __init__(self, inception: FIDInceptionV3) -> None:
        # torchmetrics keeps the feature sums and covariances in float64 (the matrix square root needs it)
        self.metric = FrechetInceptionDistance(feature=inception, reset_real_features=False)

    def add_real(self, images: Tensor) -> None:
        self.metric.update(images, real=True)

    def start_model(self) -> None:
        self.metric.reset()  # keeps the real features (reset_real_features=False)

    def add_fake(self, images: Tensor) -> None:
        self.metric.update(images, real=False)

    def compute(self) -> float:
        return float(self.metric.compute())
