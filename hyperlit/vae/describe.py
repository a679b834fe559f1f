"""What a VAE file or folder holds, for `hyperlit inspect`: layout, latent channels, quant convs, factors, size,
whether it is a full SD checkpoint, and the hashes A1111 shows. Weights are read shape-first from safetensors
headers, and .pt/.ckpt through the weights-only reader, never as pickled code."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hyperlit.files.torch_file import load_torch_file
from hyperlit.models.hashing import a1111_short_hash, file_sha256
from hyperlit.vae.taesd_layout import CLIENTS, PARTS, layout_shapes, match_layout

# Keys that mark a VAE, in each layout; the first match decides.
LDM_MARK = "decoder.conv_in.weight"
DIFFUSERS_MARK = "decoder.up_blocks.0.resnets.0.conv1.weight"
PREFIXES = ("", "first_stage_model.", "vae.")
UNET_PREFIX = "model.diffusion_model."
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _shapes_safetensors(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], set[str]]:
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {SAFETENSORS_DTYPES.get(d, d) for d in (f.get_slice(k).get_dtype() for k in f.keys())}
        return shapes, dict(f.metadata() or {}), dtypes


def _shapes_torch(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], set[str]]:
    sd = load_torch_file(path)  # the project's one weights-only reader
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    dtypes = {str(v.dtype).removeprefix("torch.") for v in tensors.values()}
    return {k: tuple(v.shape) for k, v in tensors.items()}, {}, dtypes


def read_shapes(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str], set[str]]:
    """(tensor shapes by key, safetensors metadata, dtypes) of a weights file."""
    p = Path(path)
    return _shapes_safetensors(p) if p.suffix == ".safetensors" else _shapes_torch(p)


def vae_prefix(keys: set[str] | dict) -> tuple[str, str] | None:
    """(prefix, layout) of the VAE inside a state dict's keys, or None when it holds none."""
    for prefix in PREFIXES:
        if prefix + LDM_MARK in keys and prefix + "decoder.up_blocks.0.resnets.0.norm1.weight" not in keys:
            return prefix, "ldm"
        if prefix + DIFFUSERS_MARK in keys:
            return prefix, "diffusers"
    return None


def is_vae_path(path: str | os.PathLike) -> bool:
    """A diffusers VAE folder, or a weights file with VAE keys (anything else is left to the hypernetwork reader)."""
    p = Path(path)
    if p.is_dir():
        return True
    if p.suffix not in (".safetensors", ".pt", ".ckpt", ".bin", ".pth"):
        return False
    try:
        shapes, _, _ = read_shapes(p)
    except Exception:  # noqa: BLE001 - not readable as plain weights: the hypernetwork reader reports it
        return False
    return vae_prefix(set(shapes)) is not None or match_layout(shapes) is not None


def _widths(shapes: dict[str, tuple[int, ...]], layout: str) -> list[int]:
    if layout == "ldm":
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.") and ".block.0." in k})
        return [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks.")})
    return [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in levels]


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else None


def describe_vae(path: str | os.PathLike) -> dict[str, Any]:
    """Everything `hyperlit inspect` reports about a VAE file or diffusers folder, as plain data."""
    p = Path(path).expanduser()
    config: dict[str, Any] = {}
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path}: a folder without config.json or vae/config.json")
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name") == "AutoencoderTiny":
            return describe_taesd_folder(p, folder, config)
        weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{folder}: no {' or '.join(DIFFUSERS_WEIGHTS)}")
        shapes, meta, dtypes = read_shapes(weights)
        kind, hashed = "diffusers folder", weights
    elif p.is_file():
        shapes, meta, dtypes = read_shapes(p)
        weights, hashed, kind = p, p, ""
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    taesd = match_layout(shapes)
    if taesd is not None and not p.is_dir():
        return describe_taesd_file(p, taesd.part, taesd.latent_channels, meta, dtypes)
    found = vae_prefix(set(shapes))
    if found is None:
        raise ValueError(f"{path}: no VAE keys ({LDM_MARK} or {DIFFUSERS_MARK}, optionally under first_stage_model.)")
    prefix, layout = found
    vae = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    # A1111 drops these before its strict load; a training checkpoint's leftovers are not the VAE
    vae = {k: s for k, s in vae.items() if not k.startswith(("loss.", "model_ema."))}
    leftovers = sum(1 for k in shapes if k.startswith(("loss.", "model_ema.", prefix + "loss.", prefix + "model_ema.")))
    full = any(k.startswith(UNET_PREFIX) for k in shapes)
    if not kind:
        kind = "full SD checkpoint (VAE under first_stage_model.)" if full else "single-file VAE"
        if prefix and not full:
            kind = f"VAE weights under the {prefix!r} prefix"
    scaling = config.get("scaling_factor", meta.get("hyperlit.scaling_factor"))
    shift = config.get("shift_factor", meta.get("hyperlit.shift_factor"))
    sha = file_sha256(hashed)
    return {
        "file": str(p),
        "kind": kind,
        "layout": layout,
        "full_checkpoint": full,
        "key_prefix": prefix or None,
        "latent_channels": vae["decoder.conv_in.weight"][1],
        "block_out_channels": _widths(vae, layout),
        "quant_conv": "quant_conv.weight" in vae,
        "post_quant_conv": "post_quant_conv.weight" in vae,
        "scaling_factor": _float(scaling),
        "shift_factor": _float(shift),
        "force_upcast": config.get("force_upcast"),
        "norm_num_groups": config.get("norm_num_groups") or _int(meta.get("hyperlit.norm_num_groups")),
        "parameters": sum(math.prod(s) for s in vae.values()),
        "dtypes": sorted(dtypes),
        "training_leftovers": leftovers,
        "sha256": sha,
        "sha256_of": str(hashed),
        "a1111_short_hash": a1111_short_hash(hashed),
    }


def _hashes(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "sha256_of": str(path), "a1111_short_hash": a1111_short_hash(path)}


# What every TAESD file means, whichever client reads it (README "Tiny autoencoders").
TAESD_CONVENTION = "latents in the UNet's scale ((z - shift) * scaling); decoder soft clamp tanh(z/3)*3"


def describe_taesd_file(path: Path, part: str, latent_channels: int, meta: dict, dtypes: set[str]) -> dict[str, Any]:
    """A TAESD encoder or decoder in madebyollin's layout (taesd_encoder.pth / taesd_decoder.safetensors ...)."""
    shapes = layout_shapes(part, latent_channels)
    return {
        "file": str(path),
        "kind": f"TAESD {part} (madebyollin layout)",
        "layout": "taesd",
        "latent_channels": latent_channels,
        "images": "[0, 1]",
        "convention": TAESD_CONVENTION,
        "source_scaling_factor": _float(meta.get("hyperlit.source_scaling_factor")),
        "source_shift_factor": _float(meta.get("hyperlit.source_shift_factor")),
        "clients": CLIENTS,
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "dtypes": sorted(dtypes),
        **_hashes(path),
    }


def describe_taesd_folder(path: Path, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers AutoencoderTiny folder: both halves, its config's latent conventions."""
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no {' or '.join(DIFFUSERS_WEIGHTS)}")
    shapes, _, dtypes = read_shapes(weights)
    channels = int(config.get("latent_channels", 4))
    expected = {f"{part}.layers.": layout_shapes(part, channels) for part in PARTS}
    layout = "taesd" if sum(len(v) for v in expected.values()) == len(shapes) else "AutoencoderTiny (other widths)"
    return {
        "file": str(path),
        "kind": "diffusers folder (AutoencoderTiny)",
        "layout": layout,
        "latent_channels": channels,
        "scaling_factor": _float(config.get("scaling_factor")),
        "shift_factor": _float(config.get("shift_factor")),
        "latent_magnitude": _float(config.get("latent_magnitude")),
        "latent_shift": _float(config.get("latent_shift")),
        "images": "[-1, 1]",
        "convention": TAESD_CONVENTION,
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "dtypes": sorted(dtypes),
        **_hashes(weights),
    }
