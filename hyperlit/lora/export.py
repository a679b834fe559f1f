"""A fitted LoRA as a ``.safetensors`` file in kohya's key layout or in diffusers/PEFT's.

kohya: ``lora_unet_<path>.lora_down.weight`` (r × in), ``.lora_up.weight`` (out × r), ``.alpha`` (one value for
the file; clients scale by alpha / r); V's constant, when kept, as ``<to_out_0>.diff_b``.
diffusers/PEFT: ``unet.<path>.lora_A.weight`` and ``.lora_B.weight`` (no alpha: diffusers then uses scale 1);
V's constant as PEFT's ``lora_B.bias`` of a zero rank-1 LoRA on ``to_out.0`` (``lora_bias``, PEFT >= 0.14), with
zero biases on every other lora_B because PEFT gives all of an adapter's modules a bias once one has it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from hyperlit.io import atomic_path
from hyperlit.lora.fit import LayerFit
from hyperlit.lora.keys import diffusers_key, kohya_name

__all__ = ["FORMATS", "KeyStyle", "lora_state_dict", "write_lora"]

FORMATS = ("kohya", "diffusers")


@dataclass(frozen=True)
class KeyStyle:
    """Which key layout to write, and what the kohya names of this UNet need."""

    format: str  # one of FORMATS
    sgm: bool = False  # kohya names in Stability's sgm layout (SDXL)
    layers_per_block: int = 2


def _kohya(fits: Sequence[LayerFit], style: KeyStyle, dtype: torch.dtype) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    ranks = [lora.rank for fit in fits for lora in (fit.k, fit.v) if lora is not None]
    # One alpha for every module, lora_up scaled by r / alpha so that (alpha / r) up @ down is the fit. Per-module
    # alphas would be read right by A1111 and ComfyUI, but diffusers 0.42's kohya loader drops the alphas that differ
    # from the most common one ("alpha_pattern keys did not match"), scaling those modules wrongly.
    alpha = float(max(ranks, default=1))
    for fit in fits:
        for proj, lora in (("to_k", fit.k), ("to_v", fit.v)):
            if lora is None:
                continue
            name = kohya_name(f"{fit.name}.{proj}", style.sgm, style.layers_per_block)
            out[f"{name}.lora_down.weight"] = lora.down.to(dtype).contiguous()
            out[f"{name}.lora_up.weight"] = (lora.up * (lora.rank / alpha)).to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        if fit.out_bias is not None:
            name = kohya_name(f"{fit.name}.to_out.0", style.sgm, style.layers_per_block)
            out[f"{name}.diff_b"] = fit.out_bias.to(dtype).contiguous()
    return out


def _diffusers(fits: Sequence[LayerFit], dtype: torch.dtype) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    with_bias = any(fit.out_bias is not None for fit in fits)
    for fit in fits:
        for proj, lora in (("to_k", fit.k), ("to_v", fit.v)):
            if lora is None:
                continue
            key = diffusers_key(f"{fit.name}.{proj}")
            out[f"{key}.lora_A.weight"] = lora.down.to(dtype).contiguous()
            out[f"{key}.lora_B.weight"] = lora.up.to(dtype).contiguous()
            if with_bias:
                out[f"{key}.lora_B.bias"] = torch.zeros(lora.up.shape[0], dtype=dtype)
        if fit.out_bias is not None:
            key = diffusers_key(f"{fit.name}.to_out.0")
            width = fit.out_bias.shape[0]
            # A zero rank-1 LoRA whose only effect is its lora_B bias: PEFT has no bias-only module.
            out[f"{key}.lora_A.weight"] = torch.zeros(1, fit.to_out_in, dtype=dtype)
            out[f"{key}.lora_B.weight"] = torch.zeros(width, 1, dtype=dtype)
            out[f"{key}.lora_B.bias"] = fit.out_bias.to(dtype).contiguous()
    return out


def lora_state_dict(fits: Sequence[LayerFit], style: KeyStyle, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of the file, in the chosen layout."""
    if style.format == "kohya":
        return _kohya(fits, style, dtype)
    return _diffusers(fits, dtype)


def write_lora(path: Path, tensors: dict[str, Tensor], metadata: dict[str, object]) -> Path:
    """Write atomically; metadata values that are not strings are stored as JSON (safetensors holds strings)."""
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=text)
    return path
