"""The images behind the cached latents, read again as they were encoded: the VAE round-trip check compares them
with the decoded latents (`callbacks/vae_check.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hyperlit.data.images import BadImage, Placement, decode_image, to_pixels


@dataclass(frozen=True)
class EncodedImage:
    """One encoded image: where it came from, how it was placed, and its raw (unscaled) posterior mean."""

    where: str
    placement: Placement
    latent: torch.Tensor  # C×h×w, the VAE's posterior mean before the family's scaling

    def pixels(self, max_image_pixels: int) -> torch.Tensor | None:
        """3×H×W in [-1, 1], decoded and placed exactly as for encoding; None when the file no longer reads."""
        try:
            decoded = decode_image(Path(self.where).read_bytes(), max_image_pixels)
        except (OSError, BadImage):
            return None
        return to_pixels(decoded.rgb, self.placement)
