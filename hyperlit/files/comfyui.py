"""What ComfyUI's HypernetworkLoader builds from a `.pt` file, and whether that computes A1111's function.

The rule (spec a1111-hypernetwork.md section 6, checked against comfy_extras/nodes_hypernetwork.py): ComfyUI reads
only `activation_func` (default 'linear'), `is_layer_norm`, `use_dropout`, `activate_output` and
`last_layer_dropout` (all default false; A1111 defaults `activate_output` to true) and never `dropout_structure`.
It walks each K/V module's `*.weight` keys in stored order: a Linear from the key at list position `i`; the
activation unless `i` is the last position and `activate_output` is false; with `is_layer_norm` the next key as a
LayerNorm; then Dropout(0.3) when `use_dropout`, `i` is not the last position, and `i` is not the penultimate one
unless `last_layer_dropout`. The positions count LayerNorm weights too, and `i` is the Linear's own position (taken
before the LayerNorm is consumed), so a layer-norm file's final Linear is never "last". ComfyUI never switches these
modules to eval mode, so any Dropout it builds stays active at generation time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hyperlit.files.a1111 import metadata
from hyperlit.files.content import HypernetworkFile
from hyperlit.hypernetwork import ACTIVATIONS, HypernetworkModule

# Activations ComfyUI's loader understands; it refuses files with any other one (an explicit None included).
COMFYUI_ACTIVATIONS = frozenset({"linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish"})
COMFYUI_DROPOUT = 0.3  # ComfyUI's fixed probability, whatever dropout_structure says

DROPOUT_REASON = (
    "ComfyUI builds Dropout(0.3) layers for this file (use_dropout true) and never switches them to eval mode, so "
    "they drop activations at every generation: random, different outputs each time (A1111 evaluates with dropout "
    "off)"
)


@dataclass(frozen=True)
class ComfyUIReading:
    """The metadata ComfyUI's loader reads from a file, with ComfyUI's defaults for missing keys."""

    activation: object  # activation_func as stored; 'linear' when missing
    is_layer_norm: bool
    use_dropout: bool
    activate_output: bool
    last_layer_dropout: bool

    @classmethod
    def from_metadata(cls, meta: Mapping) -> ComfyUIReading:
        return cls(
            activation=meta.get("activation_func", "linear"),
            is_layer_norm=bool(meta.get("is_layer_norm", False)),
            use_dropout=bool(meta.get("use_dropout", False)),
            activate_output=bool(meta.get("activate_output", False)),
            last_layer_dropout=bool(meta.get("last_layer_dropout", False)),
        )


@dataclass(frozen=True)
class Layer:
    """One layer of a rebuilt module: its kind ('Linear', 'LayerNorm', 'Dropout' or an activation's class name) and
    the state-dict prefix its weights come from (None for layers without weights)."""

    kind: str
    key: str | None = None


@dataclass(frozen=True)
class ComfyUIBuild:
    """The layers ComfyUI builds for one module, or why it cannot build them."""

    layers: tuple[Layer, ...]
    error: str = ""

    @property
    def dropout_layers(self) -> int:
        return sum(layer.kind == "Dropout" for layer in self.layers)

    def without_dropout(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if layer.kind != "Dropout")


@dataclass(frozen=True)
class ComfyUIVerdict:
    """Whether ComfyUI computes the file's A1111 function, how many Dropout layers it builds (all widths, K and V
    together) and, when it does not, why."""

    same_function: bool
    dropout_layers: int
    reason: str


def comfyui_build(state: Mapping[str, Tensor], reading: ComfyUIReading) -> ComfyUIBuild:
    """The layers ComfyUI rebuilds for one K or V module from its state dict (keys in stored order)."""
    prefixes = [key[: -len(".weight")] for key in state if key.endswith(".weight")]
    activation = ACTIVATIONS.get(reading.activation) if isinstance(reading.activation, str) else None
    n = len(prefixes)
    layers: list[Layer] = []
    i = 0
    while i < n:
        last, penultimate = i == n - 1, i == n - 2  # the Linear's position, before a LayerNorm is consumed
        if state[f"{prefixes[i]}.weight"].dim() != 2 or f"{prefixes[i]}.bias" not in state:
            return ComfyUIBuild(tuple(layers), f"{prefixes[i]}.weight is read as a Linear but is not one")
        layers.append(Layer("Linear", prefixes[i]))
        if reading.activation != "linear" and (not last or reading.activate_output):
            layers.append(Layer(activation.__name__ if activation else str(reading.activation)))
        if reading.is_layer_norm:
            i += 1
            if i >= n:
                return ComfyUIBuild(tuple(layers), "is_layer_norm is set but the last Linear has no LayerNorm")
            layers.append(Layer("LayerNorm", prefixes[i]))
        if reading.use_dropout and not last and (not penultimate or reading.last_layer_dropout):
            layers.append(Layer("Dropout"))
        i += 1
    return ComfyUIBuild(tuple(layers))


def a1111_layers(width: int, content: HypernetworkFile) -> tuple[Layer, ...]:
    """The layers A1111 evaluates for a module of ``width`` (eval mode: Dropout left out), built on the meta device
    by hyperlit's own A1111 builder so no weights are allocated."""
    with torch.device("meta"):
        module = HypernetworkModule(width, content.config)
    layers = []
    for index, layer in enumerate(module.linear):
        if isinstance(layer, nn.Dropout):
            continue
        kind = type(layer).__name__
        layers.append(Layer(kind, f"linear.{index}" if kind in ("Linear", "LayerNorm") else None))
    return tuple(layers)


def _names(layers: Sequence[Layer]) -> str:
    return ", ".join(layer.kind for layer in layers)


def comfyui_reading(content: HypernetworkFile) -> ComfyUIReading:
    """What ComfyUI reads: the metadata as a `.pt` stores it, or as hyperlit writes it for content built in memory."""
    return ComfyUIReading.from_metadata(content.metadata if content.metadata is not None else metadata(content))


def verdict(content: HypernetworkFile) -> ComfyUIVerdict:
    """Whether ComfyUI's loader computes the same function as A1111 for this file's content, and why not."""
    reading = comfyui_reading(content)
    if not isinstance(reading.activation, str) or reading.activation not in COMFYUI_ACTIVATIONS:
        return ComfyUIVerdict(False, 0, f"ComfyUI does not load activation {reading.activation!r}")
    dropout = 0
    differences: list[str] = []
    for width, pair in content.layers.items():
        want = a1111_layers(width, content)
        for path, state in zip(("K", "V"), pair, strict=True):
            build = comfyui_build(state, reading)
            if build.error:
                return ComfyUIVerdict(False, 0, f"ComfyUI cannot load it: width {width} {path}: {build.error}")
            dropout += build.dropout_layers
            got = build.without_dropout()
            if got != want and not differences:
                differences.append(
                    f"ComfyUI builds {_names(got)} where A1111 builds {_names(want)} (width {width} {path})"
                    if [x.kind for x in got] != [x.kind for x in want]
                    else f"ComfyUI reads width {width} {path} weights from other keys than A1111"
                )
    reasons = ([DROPOUT_REASON] if dropout else []) + differences
    if differences and reading.is_layer_norm and reading.activation != "linear" and not reading.activate_output:
        reasons.append(
            "with layer_norm and a non-linear activation ComfyUI adds an activation after the last Linear unless "
            "activate_output is true"
        )
    elif differences and "activate_output" not in (content.metadata or {"activate_output": True}):
        reasons.append("the file has no activate_output key: A1111 assumes true, ComfyUI false")
    return ComfyUIVerdict(not reasons, dropout, "; ".join(reasons))
