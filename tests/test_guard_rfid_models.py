"""rFID of several models in one evaluation: the real images' features are computed once and kept, each model's
fake features start empty, so every model's rFID equals evaluating it alone and the Fréchet formula (numpy/scipy)
on the same features. A stand-in feature network keeps it fast (the Inception network has its own test)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import linalg

from hyperlit.data.skips import SkipLog
from hyperlit.vae.evaluate import EvalImages, evaluate
from hyperlit.vae.metrics import RFID


class PooledFeatures(torch.nn.Module):
    """uint8 images -> 6 features: a fixed random projection of the 4×4 average-pooled image."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(48, 6, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)
        return pooled @ self.proj


class TintVAE(torch.nn.Module):
    """Stand-in VAE: latents are the pixels; the decoder scales and shifts them (no model, exact and fast)."""

    def __init__(self, gain: float, offset: float) -> None:
        super().__init__()
        self.gain, self.offset = gain, offset
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=z * self.gain + self.offset)


def eval_images() -> EvalImages:
    pixels = torch.randint(0, 256, (12, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return EvalImages([str(i) for i in range(12)], pixels, 16, SkipLog(verbose=False))


def frechet(real: np.ndarray, fake: np.ndarray) -> float:
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def reconstructed(vae: TintVAE, pixels: torch.Tensor) -> torch.Tensor:
    """What eval-vae feeds the metric, computed here: decode in [-1, 1], clamp, round to 8 bits."""
    y = vae.decode(pixels.double() / 127.5 - 1).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def test_every_models_rfid_equals_evaluating_it_alone():
    images, net = eval_images(), PooledFeatures()
    models = [("a", "s", TintVAE(0.9, 0.05)), ("b", "s", TintVAE(0.6, -0.2)), ("c", "s", TintVAE(1.0, 0.0))]
    together = [s.rfid for s in evaluate(models, images, rfid=RFID(net))]
    alone = [evaluate([m], images, rfid=RFID(net))[0].rfid for m in models]
    with torch.no_grad():
        real = net(images.pixels).double().numpy()
        direct = [frechet(real, net(reconstructed(vae, images.pixels)).double().numpy()) for _, _, vae in models]
    assert together == pytest.approx(alone, rel=1e-6, abs=1e-9)
    assert together == pytest.approx(direct, rel=1e-3, abs=1e-4)
    assert together[1] > together[0] > 1e-3 and together[2] == pytest.approx(0, abs=1e-4)  # c reconstructs exactly
