"""Tiny VAEs for the VAE evaluation tests: the embedded tiny VAE briefly fitted to datasets/sample, so that its
reconstructions keep the inputs' colours (the embedded one has random weights)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from hyperlit.data.images import decode_image, place, to_pixels
from hyperlit.models.tiny import build_tiny

SAMPLE = Path(__file__).resolve().parents[2] / "datasets" / "sample"


def sample_pixels(resolution: int) -> torch.Tensor:
    images = []
    for p in sorted(SAMPLE.glob("*.png")):
        rgb = decode_image(p.read_bytes()).rgb
        images.append(to_pixels(rgb, place(rgb.size, (resolution, resolution), "crop")))
    return torch.stack(images)


@functools.cache
def _fitted_state(steps: int, resolution: int) -> dict[str, torch.Tensor]:
    vae = build_tiny(0)[1]
    x = sample_pixels(resolution)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
        for _ in range(steps):
            loss = (vae(x).sample - x).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def fitted_tiny_vae(steps: int = 80, resolution: int = 16) -> AutoencoderKL:
    """The tiny VAE after ``steps`` L1 steps on the sample images (cached per process; a fresh copy each call)."""
    vae = build_tiny(0)[1]
    vae.load_state_dict(_fitted_state(steps, resolution))
    return vae.eval()


def pull_to_grey(vae: AutoencoderKL, factor: float = 0.5) -> AutoencoderKL:
    """The same decoder with its output pulled toward mid-grey: conv_out scaled, so x̂ -> factor·x̂ in [-1, 1]."""
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(factor)
        vae.decoder.conv_out.bias.mul_(factor)
    return vae
