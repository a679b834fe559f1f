"""Write a trained VAE as a diffusers folder and as an A1111 single file in the LDM (CompVis) key layout.

The diffusers -> LDM key mapping below is hand-written: diffusers and the other libraries installed here only
convert LDM -> diffusers (``convert_ldm_vae_checkpoint``), not back. The tests check it by loading our file
through that diffusers conversion, strictly, and comparing decodes with the diffusers folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from hyperlit.io import atomic_path

# diffusers attention sub-module names -> LDM's decoder.mid.attn_1.*; LDM keeps 1×1 convs, so weights become 4-D.
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RESNET = {"conv_shortcut": "nin_shortcut"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _attention(rest: str) -> str:
    for new, old in _ATTN.items():
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    raise KeyError(rest)


def diffusers_to_ldm_key(key: str, num_up_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM name; a KeyError for a key this layout does not have."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        raise KeyError(key)
    simple = {"conv_in.": "conv_in.", "conv_out.": "conv_out.", "conv_norm_out.": "norm_out."}
    for new, old in simple.items():
        if rest.startswith(new):
            return f"{part}.{old}{rest[len(new) :]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{part}.mid.block_{int(m.group(1)) + 1}.{_resnet(m.group(2))}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", rest)
    if m:
        return f"{part}.mid.attn_1.{_attention(m.group(1))}"
    m = re.match(r"down_blocks\.(\d+)\.(resnets\.(\d+)\.(.+)|downsamplers\.0\.conv\.(.+))$", rest)
    if m and part == "encoder":
        i = m.group(1)
        if m.group(3) is not None:
            return f"encoder.down.{i}.block.{m.group(3)}.{_resnet(m.group(4))}"
        return f"encoder.down.{i}.downsample.conv.{m.group(5)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)\.(.+)|upsamplers\.0\.conv\.(.+))$", rest)
    if m and part == "decoder":
        i = num_up_blocks - 1 - int(m.group(1))  # LDM numbers up blocks from the lowest resolution upward
        if m.group(3) is not None:
            return f"decoder.up.{i}.block.{m.group(3)}.{_resnet(m.group(4))}"
        return f"decoder.up.{i}.upsample.conv.{m.group(5)}"
    raise KeyError(key)


def diffusers_to_ldm(state_dict: dict[str, Tensor], num_up_blocks: int) -> dict[str, Tensor]:
    """A whole diffusers AutoencoderKL state dict in the LDM layout (no prefix, 4-D attention weights)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        try:
            new = diffusers_to_ldm_key(key, num_up_blocks)
        except KeyError:
            raise ValueError(f"cannot export VAE key {key!r}: not part of the AutoencoderKL layout") from None
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def _contiguous(sd: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in sd.items()}


def save_single_file(vae, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """``<name>.vae.safetensors`` for A1111 (strict ``first_stage_model.load_state_dict``) and ComfyUI."""
    path = Path(path)
    sd = diffusers_to_ldm(vae.state_dict(), len(vae.config.up_block_types))
    meta = {
        "format": "pt",
        "hyperlit.layout": "ldm-vae",
        "hyperlit.scaling_factor": str(vae.config.scaling_factor),
        "hyperlit.shift_factor": str(vae.config.shift_factor),
        # GroupNorm's group count is not in any tensor shape: kept here so hyperlit reads its own file back
        "hyperlit.norm_num_groups": str(vae.config.norm_num_groups),
    }
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(_contiguous(sd, dtype), str(tmp), metadata=meta)
    return path


def save_diffusers_folder(
    vae, dirpath: str | os.PathLike, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> Path:
    """``save_pretrained`` into a temporary sibling, then swap it into place (config keeps scaling/shift
    factors and force_upcast because it is the base model's own config); ``metadata`` goes into the weights'
    safetensors header."""
    dirpath = Path(dirpath)
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dirpath.parent, prefix=f".{dirpath.name}.", suffix=".tmp"))
    old = None
    try:
        # config.json via diffusers itself; weights written here so a dtype cast never touches the live model
        vae.save_config(tmp)
        save_file(
            _contiguous(vae.state_dict(), dtype),
            tmp / "diffusion_pytorch_model.safetensors",
            metadata={"format": "pt", **(metadata or {})},
        )
        if dirpath.exists():
            old = dirpath.with_name(f".{dirpath.name}.old-{os.getpid()}")
            os.replace(dirpath, old)
        os.replace(tmp, dirpath)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dirpath
