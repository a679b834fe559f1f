"""Tiny models built from init dicts in the tests (diffusers' habit): one dict per class, reused."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

# Two levels of 8/16 channels: an SD-shaped VAE (4 latent channels, factor 2) that trains in a second on a CPU.
TINY_VAE = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)


def make_tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    """A fresh TINY_VAE (with overrides) whose weights are drawn from seed."""
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY_VAE, **overrides})
