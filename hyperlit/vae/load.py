"""Load a VAE to fine-tune: a diffusers folder, a single-file VAE (LDM keys) or the VAE inside a full SD
checkpoint (``first_stage_model.`` prefix). LDM keys are converted by diffusers' own
``convert_ldm_vae_checkpoint``; the architecture is read off the weights' shapes, so no config download."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL
from safetensors import safe_open
from torch import Tensor

from hyperlit.pretrained import OFFLINE
from hyperlit.vae.lpips import load_weights_file

VAE_PREFIXES = ("first_stage_model.", "vae.")


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    # A1111 drops training leftovers the same way before its strict load.
    return {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}


def ldm_vae_config(sd: dict[str, Tensor], norm_num_groups: int = 32) -> dict[str, Any]:
    """The AutoencoderKL config implied by an LDM-layout VAE state dict."""
    downs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not downs or "decoder.conv_in.weight" not in sd:
        raise ValueError("no LDM VAE keys (encoder.down.N..., decoder.conv_in.weight) found")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in downs],
        "layers_per_block": len(blocks),
        "down_block_types": ["DownEncoderBlock2D"] * len(downs),
        "up_block_types": ["UpDecoderBlock2D"] * len(downs),
        "norm_num_groups": norm_num_groups,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def file_norm_num_groups(path: Path) -> int:
    """The GroupNorm group count a single file says it was written with (hyperlit's exports), else SD's 32."""
    if path.suffix != ".safetensors":
        return 32
    with safe_open(str(path), "pt") as f:
        value = (f.metadata() or {}).get("hyperlit.norm_num_groups")
    return int(value) if value and value.isdigit() else 32


def load_vae(
    path: str | os.PathLike,
    *,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    force_upcast: bool | None = None,
    norm_num_groups: int | None = None,
    key: str = "model.path",
) -> AutoencoderKL:
    """Read the VAE at ``path``. Factors given here override the file's (single files carry none).

    ``norm_num_groups`` of a single file: None reads it from the file's metadata (hyperlit's exports carry it), else
    32, SD's."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{key}={str(path)!r}: a folder without config.json or vae/config.json")
        vae = AutoencoderKL.from_pretrained(folder, **OFFLINE)
    elif p.is_file():
        sd = _strip_prefix(load_weights_file(p, key))
        if any(k.startswith("decoder.up_blocks.") for k in sd):
            raise ValueError(
                f"{key}={str(path)!r} holds diffusers-layout VAE keys; put it in a folder with its config.json"
            )
        if norm_num_groups is None:
            norm_num_groups = file_norm_num_groups(p)
        try:
            config = ldm_vae_config(sd, norm_num_groups)
        except ValueError as e:
            raise ValueError(f"{key}={str(path)!r}: not a VAE or SD checkpoint ({e})") from None
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        converted = convert_ldm_vae_checkpoint(sd, config)
        vae = AutoencoderKL.from_config(config)
        missing, unexpected = vae.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{key}={str(path)!r}: VAE weights do not fit the inferred layout {config['block_out_channels']} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    else:
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file or folder")
    updates = {
        k: v
        for k, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor), ("force_upcast", force_upcast))
        if v is not None
    }
    if updates:
        vae.register_to_config(**updates)
    return vae


def check_vae_layout(vae: AutoencoderKL, latent_channels: int | None, use_quant_conv: bool | None, source: str) -> None:
    """A VAE whose latent width or quant-conv layout does not match the config is an error naming both."""
    got = int(vae.config.latent_channels)
    if latent_channels is not None and got != latent_channels:
        raise ValueError(
            f"the VAE from {source} has {got} latent channels but the config expects {latent_channels} "
            "(latent_channels / the model family); pick the matching model family or VAE file"
        )
    has_quant = vae.quant_conv is not None
    if use_quant_conv is not None and has_quant != use_quant_conv:

        def layout(q: bool) -> str:
            return "with quant convs (SD layout)" if q else "without quant convs (SD3/FLUX layout)"

        raise ValueError(
            f"the VAE from {source} is {layout(has_quant)} but the config expects one "
            f"{layout(use_quant_conv)} (use_quant_conv)"
        )
