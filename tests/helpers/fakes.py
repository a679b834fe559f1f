"""A counting fake encoder for the data tests: SDComponents' encode calls without a model."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from hyperlit.models.components import TextEmbedding


class FakeEncoder:
    """SDComponents stand-in: VAE = 8× average pool to 4 channels, text = hashed vectors; counts every call."""

    context_dim = 32

    def __init__(self, vae_version: str = "v1", text_version: str = "v1") -> None:
        self.vae_version = vae_version
        self.text_version = text_version
        self.image_calls = 0
        self.images_encoded = 0
        self.text_calls = 0
        self.prompts_encoded: list[str] = []

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert pixels.ndim == 4 and pixels.shape[1] == 3
        assert -1.0 - 1e-5 <= float(pixels.min()) and float(pixels.max()) <= 1.0 + 1e-5
        self.image_calls += 1
        self.images_encoded += pixels.shape[0]
        pooled = F.avg_pool2d(pixels, 8)
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        return mean, torch.full_like(mean, 0.5)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - 0.1) * 0.5

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / 0.5 + 0.1

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        self.text_calls += 1
        self.prompts_encoded.extend(captions)
        return torch.stack([text_vector(c) for c in captions])

    def encode_prompts(self, captions: list[str]) -> TextEmbedding:
        return TextEmbedding(self.encode_text(captions))

    def fingerprint(self, component: str) -> str:
        return f"fake-{component}-{self.vae_version if component == 'vae' else self.text_version}"


def text_vector(caption: str) -> torch.Tensor:
    seed = int(hashlib.sha256(caption.encode()).hexdigest()[:15], 16)
    return torch.randn(77, FakeEncoder.context_dim, generator=torch.Generator().manual_seed(seed))
