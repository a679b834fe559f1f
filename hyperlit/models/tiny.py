"""The embedded tiny SD-shaped model: shipped configs + a fixed seed, random but reproducible weights, no download."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .family import FAMILIES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable Latin-1 map to themselves,
    the rest to code points from 256 upward), in byte order. CLIP's vocab starts with these."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_level_vocab() -> dict[str, int]:
    """The shipped tiny tokenizer vocab (configs/tiny/tokenizer/vocab.json): every byte, every byte ending a
    word (`</w>`), then CLIP's two special tokens, in CLIP's order. No merges, so each character is a token."""
    alphabet = byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """UNet, VAE and text encoder from the shipped tiny configs with weights drawn from `seed`.

    The global RNG is left untouched (fork_rng) so building the model never shifts a training run's randomness.
    """
    config_dir = FAMILIES["tiny"].config_dir
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    return unet, vae, text_encoder
