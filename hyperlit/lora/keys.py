"""LoRA key names for a diffusers UNet module path, in kohya's layout and in diffusers/PEFT's.

kohya names a module ``lora_unet_`` + its path with every ``.`` turned into ``_``. For SD1/SD2 that path is the
diffusers one (kohya trains those on a diffusers UNet); for SDXL it is Stability's sgm path (``input_blocks.4.1``
for ``down_blocks.1.attentions.0``), which is what kohya, A1111 and ComfyUI write and read for SDXL. diffusers'
own kohya converter undoes both (tests/test_lora.py checks it). diffusers/PEFT keys are ``unet.`` + the path.
"""

from __future__ import annotations

import re

__all__ = ["KOHYA_PREFIX", "diffusers_key", "kohya_name", "sgm_path"]

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "unet."

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")


def sgm_path(path: str, layers_per_block: int) -> str:
    """The sgm (Stability/LDM) path of a diffusers UNet attention-block module path.

    Each down level holds `layers_per_block` (resnet, attention) pairs plus a downsampler, after conv_in at
    input_blocks.0; each up level holds one more pair; the attention is item 1 of its block.
    """
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    if m := _DOWN.match(path):
        return f"input_blocks.{1 + int(m[1]) * per_down + int(m[2])}.1.{m[3]}"
    if m := _UP.match(path):
        return f"output_blocks.{int(m[1]) * per_up + int(m[2])}.1.{m[3]}"
    if m := _MID.match(path):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"{path}: not an attention-block module path of a diffusers UNet")


def kohya_name(path: str, sgm: bool, layers_per_block: int) -> str:
    """``lora_unet_...`` for a diffusers module path; `sgm` for SDXL-family models (see the module docstring)."""
    return KOHYA_PREFIX + (sgm_path(path, layers_per_block) if sgm else path).replace(".", "_")


def diffusers_key(path: str) -> str:
    """``unet.<path>``: the prefix diffusers' `load_lora_weights` routes to the UNet."""
    return DIFFUSERS_PREFIX + path
