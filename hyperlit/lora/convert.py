"""A hypernetwork as a LoRA on a loaded base model: which layers it touches, their inputs, their fits, the file."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from hyperlit.hypernetwork import Hypernetwork
from hyperlit.lora.export import KeyStyle, lora_state_dict, write_lora
from hyperlit.lora.fit import FitSettings, LayerFit, fit_layer, stream_of
from hyperlit.lora.inputs import DataItems, LayerInputs, gather_inputs
from hyperlit.models import SDComponents

log = logging.getLogger(__name__)

__all__ = [
    "Conversion",
    "GatheredInputs",
    "convert",
    "fit_all",
    "gather",
    "key_style",
    "touched_layers",
    "write_conversion",
]

# kohya's metadata keys that A1111's Lora loader reads to tell the base model's version apart.
KOHYA_VERSION = {"sd21": {"ss_v2": "True"}, "sdxl": {"ss_base_model_version": "sdxl_base_v1-0"}}


@dataclass(frozen=True)
class Conversion:
    """The fitted layers, in UNet order."""

    fits: list[LayerFit]


def touched_layers(unet: nn.Module, hn: Hypernetwork) -> dict[str, Attention]:
    """The UNet's attention layers whose context width the network has modules for, by module path."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention)
        and module.to_k is not None
        and getattr(module, "added_kv_proj_dim", None) is None
        and module.to_k.in_features in hn.sizes
    }


@dataclass(frozen=True)
class GatheredInputs:
    """The touched layers and the input streams they read: gathered once, fitted at any settings."""

    layers: dict[str, Attention]
    streams: dict[str, LayerInputs]


def gather(hn: Hypernetwork, components: SDComponents, data: DataItems, resolution: int) -> GatheredInputs:
    """Run the base model on the data (and the built-in prompts) to collect every touched layer's inputs."""
    hn = hn.eval().to(components.unet.device)
    layers = touched_layers(components.unet, hn)
    self_layers = {name: attn for name, attn in layers.items() if not attn.is_cross_attention}
    return GatheredInputs(layers, gather_inputs(hn, components, self_layers, data, resolution))


def fit_all(gathered: GatheredInputs, settings: FitSettings) -> Conversion:
    """Fit every touched layer from its stream, in UNet order."""
    return Conversion(
        [
            fit_layer(name, attn, gathered.streams[stream_of(name, attn)], settings)
            for name, attn in gathered.layers.items()
        ]
    )


def convert(
    hn: Hypernetwork, components: SDComponents, data: DataItems, settings: FitSettings, resolution: int
) -> Conversion:
    """Gather every touched layer's inputs through the base model, then fit each layer."""
    return fit_all(gather(hn, components, data, resolution), settings)


def key_style(fmt: str, components: SDComponents) -> KeyStyle:
    """kohya names SDXL-family layers by Stability's sgm paths (two text encoders mark the family)."""
    sgm = len(components.family.text_encoders) > 1
    return KeyStyle(fmt, sgm=sgm, layers_per_block=int(components.unet.config.layers_per_block))


def write_conversion(
    path: Path, conversion: Conversion, style: KeyStyle, dtype: torch.dtype, metadata: dict[str, object]
) -> Path:
    """The LoRA file with the fit report (every layer's ranks, energies and held-out errors) in its metadata."""
    tensors = lora_state_dict(conversion.fits, style, dtype)
    report = [asdict(fit.report) for fit in conversion.fits]
    family = str(metadata.get("hyperlit_base_model_family", ""))
    extra: dict[str, object] = {"hyperlit_fit": report, **KOHYA_VERSION.get(family, {})}
    if style.format == "kohya":
        extra["ss_network_module"] = "networks.lora"
    else:
        extra["format"] = "pt"  # what diffusers writes into its own LoRA files
    return write_lora(path, tensors, {**metadata, **extra})
