"""TAESD weights: diffusers ``AutoencoderTiny`` <-> madebyollin's module layout, and the files clients load.

madebyollin's ``taesd.py`` builds each half as one ``nn.Sequential``; his ``taesd_encoder.pth`` /
``taesd_decoder.pth`` are those Sequentials' state dicts, keys without a prefix (``0.weight``,
``1.conv.0.weight``, ...). diffusers' ``EncoderTiny`` / ``DecoderTiny`` hold the same layers in ``.layers`` with the
same sub-module names (``conv.0/2/4``, ``skip``, ``fuse``), except that his decoder starts with a ``Clamp`` module
(index 0, no weights) which diffusers applies inside ``forward``; so decoder index i here is i + 1 there.

Conventions (the same in both): the encoder maps images in [0, 1] (diffusers: [-1, 1], rescaled inside) to latents
in the scale the UNet sees, ``(vae_latent - shift_factor) * scaling_factor``, so the tiny model's own
``scaling_factor`` is 1.0; the decoder first soft-clamps latents to (-3, 3) with ``tanh(z / 3) * 3`` and returns
images in [0, 1] (diffusers: [-1, 1]). ``latent_magnitude=3`` / ``latent_shift=0.5`` map latents to [0, 1]
for 8-bit storage: ``z / 6 + 0.5``.
"""

from __future__ import annotations

import functools
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file
from torch import Tensor

from hyperlit.io import atomic_path

PARTS = ("encoder", "decoder")
# madebyollin's index of diffusers' ``layers.i``: his decoder has a weightless Clamp() at index 0.
INDEX_OFFSET = {"encoder": 0, "decoder": 1}
LATENT_MAGNITUDE = 3  # the decoder's soft clamp bound, and half the range mapped to [0, 1] for storage
LATENT_SHIFT = 0.5
# Where clients look for these files (README "Tiny autoencoders").
CLIENTS = "A1111: models/VAE-taesd/<name>_decoder.pth; ComfyUI: models/vae_approx/<name>_{encoder,decoder}.safetensors"
_KEY = re.compile(r"^(\d+)\.(.+)$")


def tiny_autoencoder(latent_channels: int = 4) -> AutoencoderTiny:
    """An untrained AutoencoderTiny in madebyollin's shape (4 stages of 64 channels, factor 8) for a latent space
    of ``latent_channels``; scaling 1.0 because its latents are already in the UNet's scale."""
    return AutoencoderTiny(
        latent_channels=latent_channels,
        latent_magnitude=LATENT_MAGNITUDE,
        latent_shift=LATENT_SHIFT,
        scaling_factor=1.0,
        shift_factor=0.0,
        force_upcast=False,
    )


def to_madebyollin(state: Mapping[str, Tensor], part: str) -> dict[str, Tensor]:
    """``<part>.layers.i.rest`` of an AutoencoderTiny state dict -> madebyollin's ``<i + offset>.rest``."""
    prefix = f"{part}.layers."
    out: dict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        index, _, rest = key[len(prefix) :].partition(".")
        out[f"{int(index) + INDEX_OFFSET[part]}.{rest}"] = value
    if not out:
        raise ValueError(f"no {prefix}* keys: not an AutoencoderTiny state dict")
    return out


def from_madebyollin(state: Mapping[str, Tensor], part: str) -> dict[str, Tensor]:
    """madebyollin's ``i.rest`` keys of one half -> ``<part>.layers.<i - offset>.rest`` (AutoencoderTiny)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None or int(m.group(1)) < INDEX_OFFSET[part]:
            raise ValueError(f"key {key!r} is not part of madebyollin's TAESD {part} layout")
        out[f"{part}.layers.{int(m.group(1)) - INDEX_OFFSET[part]}.{m.group(2)}"] = value
    return out


@functools.lru_cache(maxsize=8)
def layout_shapes(part: str, latent_channels: int) -> dict[str, tuple[int, ...]]:
    """Every key and shape of madebyollin's ``part`` file for ``latent_channels`` (from a fresh model)."""
    with torch.device("meta"):
        model = tiny_autoencoder(latent_channels)
    return {k: tuple(v.shape) for k, v in to_madebyollin(model.state_dict(), part).items()}


@dataclass(frozen=True)
class TAESDPart:
    part: str  # encoder | decoder
    latent_channels: int


def match_layout(shapes: Mapping[str, tuple[int, ...]]) -> TAESDPart | None:
    """Which half of madebyollin's layout these keys/shapes are exactly (every key, every shape), if any."""
    if "0.weight" in shapes and len(shapes["0.weight"]) == 4 and shapes["0.weight"][1] == 3:
        part = "encoder"
        channels = shapes.get("14.weight", (0,))[0]
    elif "1.weight" in shapes and len(shapes["1.weight"]) == 4:
        part = "decoder"
        channels = shapes["1.weight"][1]
    else:
        return None
    if channels < 1 or dict(shapes) != layout_shapes(part, int(channels)):
        return None
    return TAESDPart(part, int(channels))


def _contiguous(state: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    return OrderedDict(
        (k, (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()) for k, v in state.items()
    )


def save_taesd_files(
    model: AutoencoderTiny,
    dirpath: str | os.PathLike,
    name: str = "taesd",
    parts: tuple[str, ...] = PARTS,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """``<name>_<part>.safetensors`` and ``<name>_<part>.pth`` (a plain state dict, what A1111 and madebyollin's
    ``torch.load(weights_only=True)`` read) for each part, each written to a temporary name and renamed."""
    out: list[Path] = []
    for part in parts:
        state = _contiguous(to_madebyollin(model.state_dict(), part), dtype)
        meta = {
            "format": "pt",
            "hyperlit.layout": f"taesd-{part}",
            "hyperlit.latent_channels": str(model.config.latent_channels),
            **dict(metadata or {}),
        }
        path = Path(dirpath) / f"{name}_{part}.safetensors"
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata=meta)
        pth = path.with_suffix(".pth")
        with atomic_path(pth, suffix=".pth") as tmp:
            torch.save(state, tmp)
        out += [path, pth]
    return out


def load_taesd_part(model: AutoencoderTiny, state: Mapping[str, Tensor], part: str, source: str) -> None:
    """Load one of madebyollin's half files into ``model`` strictly; a mismatch names ``source``."""
    found = match_layout({k: tuple(v.shape) for k, v in state.items()})
    if found is None or found.part != part:
        raise ValueError(f"{source}: not a TAESD {part} in madebyollin's layout")
    if found.latent_channels != model.config.latent_channels:
        raise ValueError(
            f"{source}: a TAESD {part} for {found.latent_channels} latent channels, "
            f"but the model has {model.config.latent_channels}"
        )
    getattr(model, part).load_state_dict(
        {k.removeprefix(f"{part}."): v for k, v in from_madebyollin(state, part).items()}, strict=True
    )
