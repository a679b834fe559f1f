"""Single-file SD checkpoints in the original LDM key layout (.safetensors / .ckpt), converted by diffusers."""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hyperlit.files.torch_file import load_torch_file

from .family import FAMILIES, ModelFamily

log = logging.getLogger(__name__)

SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt")
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: OpenAI CLIP in transformers layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP layout
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP-L in transformers layout
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP bigG layout (with text_projection)


@dataclass
class FrozenParts:
    """The networks of one base model, as loaded (before dtype and freezing)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection | None = None

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file on CPU. `.ckpt` is read with weights_only=True: no pickled code runs."""
    try:
        if path.suffix.lower() == ".safetensors":
            sd: dict = safetensors.torch.load_file(str(path), device="cpu")
        else:
            sd = load_torch_file(path, label=f"model.path={path}")
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise ValueError(f"model.path={path} is not a readable checkpoint (not a torch state dict)") from None
        raise ValueError(
            f"model.path={path} holds pickled objects beyond tensors ({found[1]}), which weights_only loading "
            f"refuses for safety; convert it to .safetensors with a trusted tool"
        ) from None
    except (OSError, RuntimeError, EOFError, safetensors.SafetensorError) as e:
        raise ValueError(f"model.path={path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    while isinstance(sd, dict) and "state_dict" in sd:  # Lightning/LDM checkpoints nest the weights
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"model.path={path} does not hold a state dict (found {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def peek_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes from a .safetensors header without reading weights; None for formats that cannot."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, safetensors.SafetensorError) as e:
        raise ValueError(f"model.path={path} is not a readable .safetensors file ({e})") from None


def context_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Cross-attention context width of an LDM UNet (in-features of any attn2.to_k)."""
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def check_family(shapes: dict[str, tuple[int, ...]], family: ModelFamily, path: Path) -> None:
    """Refuse a checkpoint that is not of `family`, naming what it looks like instead."""
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        hint = " (it looks like SDXL)" if any(k.startswith(SDXL_PREFIX) for k in shapes) else ""
        raise ValueError(
            f"model.path={path} has no UNet weights under '{UNET_PREFIX}'{hint}; expected a full {family.name} "
            f"checkpoint in the original LDM key layout"
        )
    width = context_width(shapes)
    if width is not None and width != family.context_dim:
        matches = [f.name for f in FAMILIES.values() if f.context_dim == width]
        hint = f"; it looks like {'/'.join(matches)}: set model={matches[0]}" if matches else ""
        raise ValueError(
            f"model.path={path} has cross-attention context width {width}, but model.family={family.name} "
            f"expects {family.context_dim}{hint}"
        )


def _text_state_dicts(
    sd: dict[str, torch.Tensor], family: ModelFamily, text_encoder: torch.nn.Module, path: Path
) -> list[dict[str, torch.Tensor]]:
    """diffusers-layout state dicts of the family's text encoders, in `family.text_encoders` order."""
    if len(family.text_encoders) > 1:
        if not any(k.startswith(SDXL_CLIP_PREFIX) for k in sd) or not any(
            k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in sd
        ):
            raise ValueError(
                f"model.path={path} has no SDXL text encoders under '{SDXL_CLIP_PREFIX}' and '{SDXL_OPEN_CLIP_PREFIX}'"
            )
        clip = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(SDXL_CLIP_PREFIX)})
        open_clip = convert_open_clip_checkpoint(text_encoder, sd, prefix=SDXL_OPEN_CLIP_PREFIX)
        return [clip, open_clip]
    if any(k.startswith(CLIP_PREFIX) for k in sd):
        return [convert_ldm_clip_checkpoint(sd)]
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in sd):
        return [convert_open_clip_checkpoint(text_encoder, sd, prefix=OPEN_CLIP_PREFIX)]
    raise ValueError(f"model.path={path} has no text encoder under '{CLIP_PREFIX}' (SD1) or '{OPEN_CLIP_PREFIX}' (SD2)")


def fit_text_keys(text_sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Converted CLIP keys in the layout the built module uses: transformers >= 5.6 flattened CLIPTextModel (no
    `text_model.` level) but not CLIPTextModelWithProjection; older checkpoints carry position_ids as a persistent
    buffer, which is now derived."""
    nested = any(k.startswith("text_model.") for k in expected)
    out = {}
    for k, v in text_sd.items():
        if k.endswith("position_ids"):
            continue
        bare = k.removeprefix("text_model.")
        out[f"text_model.{bare}" if nested and not bare.startswith("text_projection") else bare] = v
    return out


def _fill_position_ids(module: torch.nn.Module) -> None:
    """CLIP's position_ids is a non-persistent buffer (never in a state dict): a module built on the meta device
    gets it rebuilt here, so nothing is left on meta."""
    for sub in module.modules():
        ids = getattr(sub, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            sub.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(ids.shape), persistent=False)


def load_matching(
    build: Callable[[], torch.nn.Module], state_dict: dict[str, torch.Tensor], what: str, path: Path, meta: bool
) -> torch.nn.Module:
    """Build a module and load `state_dict` into it, refusing missing weights or shape mismatches with a
    message naming both shapes. `meta=True` builds without allocating random weights (the loaded tensors
    are assigned), for modules without non-persistent buffers."""
    if meta:
        with torch.device("meta"):
            module = build()
    else:
        module = build()
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or wrong:
        detail = "; ".join(wrong[:3] + [f"missing {k}" for k in missing[:3]])
        raise ValueError(
            f"model.path={path}: the {what} weights do not match the model config "
            f"({len(wrong)} shape mismatches, {len(missing)} missing; e.g. {detail})"
        )
    unexpected = sorted(state_dict.keys() - expected.keys())
    if unexpected:
        log.warning("%s: ignoring %d unexpected %s keys, e.g. %s", path, len(unexpected), what, unexpected[:3])
    module.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=meta)
    return module


def convert_checkpoint(sd: dict[str, torch.Tensor], family: ModelFamily, config_dir: Path, path: Path) -> FrozenParts:
    """Build the family's networks on the meta device and assign the converted tensors of `sd` to them.

    Nothing is allocated beyond the tensors of `sd` themselves, so a full-size SDXL file given as meta tensors
    checks every shape without memory (tests do that), and a real file costs its own size once.
    """
    check_family({k: tuple(v.shape) for k, v in sd.items()}, family, path)
    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    vae_config = AutoencoderKL.load_config(config_dir / "vae")
    try:
        unet_sd = convert_ldm_unet_checkpoint(sd, unet_config)
        vae_sd = convert_ldm_vae_checkpoint(sd, vae_config)
    except (KeyError, IndexError, AttributeError) as e:  # the converter indexes blocks the config promises
        raise ValueError(
            f"model.path={path} does not have the block layout of model.family={family.name} ({type(e).__name__}: {e})"
        ) from None
    unet = load_matching(lambda: UNet2DConditionModel.from_config(unet_config), unet_sd, "UNet", path, meta=True)
    vae = load_matching(lambda: AutoencoderKL.from_config(vae_config), vae_sd, "VAE", path, meta=True)

    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    configs = [CLIPTextConfig.from_pretrained(config_dir / name) for name in family.text_encoders]
    with torch.device("meta"):  # the OpenCLIP converter only reads the config off this one
        first = classes[family.text_encoders[-1]](configs[-1])
    encoders = []
    for name, config, text_sd in zip(
        family.text_encoders, configs, _text_state_dicts(sd, family, first, path), strict=True
    ):
        cls = classes[name]
        with torch.device("meta"):
            expected = set(cls(config).state_dict())
        encoder = load_matching(
            lambda c=cls, cf=config: c(cf),
            fit_text_keys(text_sd, expected),
            f"{name.replace('_', ' ')}",
            path,
            meta=True,
        )
        _fill_position_ids(encoder)
        encoders.append(encoder)
    return FrozenParts(unet, vae, *encoders)


def load_single_file(path: Path, family: ModelFamily, config_dir: Path) -> FrozenParts:
    """UNet, VAE and text encoder(s) from an LDM/sgm-layout file, shaped by the diffusers configs in `config_dir`."""
    return convert_checkpoint(read_checkpoint(path), family, config_dir, path)
