"""Tiny autoencoders for tests of the code that reads and uses TAESD files."""

from __future__ import annotations

import torch
from diffusers import AutoencoderTiny

from hyperlit.vae.taesd_layout import tiny_autoencoder


def textured_taesd(seed: int, latent_channels: int = 4) -> AutoencoderTiny:
    """A random TAESD whose images vary with the input (a fresh one decodes everything to near-black)."""
    torch.manual_seed(seed)
    model = tiny_autoencoder(latent_channels)
    with torch.no_grad():
        model.encoder.layers[-1].weight.mul_(10)
        model.decoder.layers[-1].weight.mul_(20)
        model.decoder.layers[-1].bias.add_(0.96)
    return model.eval()
