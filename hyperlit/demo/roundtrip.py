"""The tiny base's autoencoder round trip of images (encode, take the posterior's mode, decode).

A style the autoencoder cannot reproduce cannot be learned by anything that works in its latent space; the style
suite's tests and benchmark judge the styles on round-tripped renders (docs/benchmarks.md, "Style suite").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from hyperlit.models.loader import embedded_tiny_vae
from hyperlit.vae.metrics import psnr_per_image


@torch.no_grad()
def round_trip(images: Sequence[Image.Image], vae: AutoencoderKL | None = None, batch: int = 32) -> list[Image.Image]:
    """Each image encoded and decoded by `vae` (default: the embedded tiny base's), as 8-bit RGB images."""
    vae = vae if vae is not None else embedded_tiny_vae()
    vae.eval()
    out: list[Image.Image] = []
    for i in range(0, len(images), batch):
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images[i : i + batch]])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        pixels = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out += [Image.fromarray(p) for p in pixels]
    return out


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """PSNR of `image` against `reference` in dB on 8-bit pixels (hyperlit.vae.metrics; identical images: inf)."""
    a, b = (torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None] for im in (image, reference))
    return float(psnr_per_image(b, a)[0])
