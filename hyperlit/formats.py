"""Hypernetwork files by extension: A1111 ``.pt`` (see :mod:`hyperlit.a1111`) or hyperlit's ``.safetensors``.

The safetensors layout is hyperlit's own: tensors keyed ``<width>.<0=K|1=V>.<A1111 key>`` and the
architecture as JSON in the metadata, so no pickle is involved at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hyperlit import a1111
from hyperlit.a1111 import HypernetworkFile, HypernetworkFileError
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.io import atomic_path

log = logging.getLogger(__name__)

SAFETENSORS_FORMAT = "hyperlit-hypernetwork"
LAYOUT_SAFETENSORS = "hyperlit safetensors"
EXTENSIONS = (".pt", ".safetensors")


def _extension(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise HypernetworkFileError(
            f"{path}: extension {suffix or '(none)'!r} is not a hypernetwork format; allowed: {', '.join(EXTENSIONS)}"
        )
    return suffix


def _in_module_order(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys back in ``state_dict()`` order (Sequential index numerically, weight before bias).

    safetensors stores names sorted as text (linear.0.bias, linear.0.weight, linear.10..., linear.2...); a ``.pt``
    written in that order breaks ComfyUI, which rebuilds the layers from the ``*.weight`` keys in stored order.
    """
    def order(key: str) -> tuple[int, int, str]:
        parts = key.split(".")
        index = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1
        return index, {"weight": 0, "bias": 1}.get(parts[-1], 2), key

    return {key: state[key] for key in sorted(state, key=order)}


def read_safetensors(path: str | Path) -> HypernetworkFile:
    path = Path(path)
    if not path.is_file():
        raise HypernetworkFileError(f"{path}: no such file")
    try:
        tensors = load_file(path, device="cpu")
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
    except (SafetensorError, OSError, ValueError) as err:
        raise HypernetworkFileError(f"{path}: not a readable safetensors file: {err}") from None
    meta = header.get("__metadata__", {})
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise HypernetworkFileError(
            f"{path}: not a hyperlit hypernetwork (metadata 'format' is {meta.get('format')!r}, "
            f"expected {SAFETENSORS_FORMAT!r})"
        )
    try:
        config = HypernetworkConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise HypernetworkFileError(f"{path}: the 'config' metadata is not valid: {err}") from None
    layers: dict[int, tuple[dict, dict]] = {}
    for key, tensor in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in ("0", "1"):
            raise HypernetworkFileError(f"{path}: tensor {key!r} is not '<width>.<0|1>.<key>'")
        width, path_index, param = parts
        pair = layers.setdefault(int(width), ({}, {}))
        pair[int(path_index)][param] = tensor.float()
    # safetensors sorts tensor names; the config keeps the width order, which fixes the parameter order.
    order = config.sizes if isinstance(config.sizes, list) else sorted(layers)
    if sorted(order) != sorted(layers):
        raise HypernetworkFileError(f"{path}: config sizes {order} do not match the stored widths {sorted(layers)}")
    step = meta.get("step", "0")
    return HypernetworkFile(
        config=config,
        layers={width: tuple(_in_module_order(state) for state in layers[width]) for width in order},
        name=meta.get("name") or path.stem,
        step=int(step) if step.isdigit() else 0,
        sd_checkpoint=meta.get("sd_checkpoint") or None,
        sd_checkpoint_name=meta.get("sd_checkpoint_name") or None,
        optional_info=meta.get("optional_info") or None,
        layout=LAYOUT_SAFETENSORS,
    )


def write_safetensors(path: str | Path, content: HypernetworkFile) -> Path:
    path = Path(path)
    content.name = path.stem
    tensors = {
        # clone: a .pt may store the same tensors for K and V, and safetensors refuses shared memory
        f"{width}.{index}.{key}": tensor.detach().to("cpu", torch.float32).contiguous().clone()
        for width, pair in content.layers.items()
        for index, state in enumerate(pair)
        for key, tensor in state.items()
    }
    config = replace(content.config, sizes=list(content.layers))
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "config": json.dumps(config.to_dict()),
        "name": content.name,
        "step": str(int(content.step)),
        "sd_checkpoint": content.sd_checkpoint or "",
        "sd_checkpoint_name": content.sd_checkpoint_name or "",
        "optional_info": content.optional_info or "",
    }
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_file(path: str | Path) -> HypernetworkFile:
    path = Path(path)
    return a1111.read_pt(path) if _extension(path) == ".pt" else read_safetensors(path)


def write_file(path: str | Path, content: HypernetworkFile) -> Path:
    path = Path(path)
    return a1111.write_pt(path, content) if _extension(path) == ".pt" else write_safetensors(path, content)


def to_file_content(hn: Hypernetwork) -> HypernetworkFile:
    return HypernetworkFile(
        config=replace(hn.config, sizes=hn.sizes),
        layers=hn.layer_state_dicts(),
        name=hn.name,
        step=hn.step,
        sd_checkpoint=hn.sd_checkpoint,
        sd_checkpoint_name=hn.sd_checkpoint_name,
        optional_info=hn.optional_info,
    )


def from_file_content(content: HypernetworkFile, source: str) -> Hypernetwork:
    hn = Hypernetwork(content.config, sizes=list(content.layers), name=content.name)
    try:
        hn.load_layer_state_dicts(content.layers, source=source)
    except ValueError as err:
        raise HypernetworkFileError(str(err)) from None
    hn.step = content.step
    hn.sd_checkpoint = content.sd_checkpoint
    hn.sd_checkpoint_name = content.sd_checkpoint_name
    hn.optional_info = content.optional_info
    hn.source_layout = content.layout
    return hn


def load_hypernetwork(path: str | Path) -> Hypernetwork:
    """Load a ``.pt`` (any A1111 layout) or hyperlit ``.safetensors`` into an eval-mode :class:`Hypernetwork`."""
    hn = from_file_content(read_file(path), source=str(path))
    return hn.eval()


def save_hypernetwork(
    hn: Hypernetwork,
    path: str | Path,
    optimizer_state: dict | None = None,
    optimizer_name: str = "AdamW",
) -> Path:
    """Save by extension; with ``optimizer_state`` a ``.pt`` also gets A1111's ``.pt.optim`` beside it."""
    path = write_file(path, to_file_content(hn))
    if optimizer_state is not None and path.suffix.lower() == ".pt":
        a1111.write_optim(path, optimizer_state, optimizer_name)
    return path


def strip_dropout(content: HypernetworkFile) -> HypernetworkFile:
    """An inference copy without Dropout slots: renumbered keys, same eval-mode function (spec §7)."""
    stripped_config = replace(content.config, dropout_structure=None, sizes=list(content.layers))
    source = from_file_content(content, source="input")
    target = Hypernetwork(stripped_config, sizes=list(content.layers), name=content.name)
    # Dropout has no parameters, so both modules list the same parameters in the same order.
    with torch.no_grad():
        for dst, src in zip(target.parameters(), source.parameters(), strict=True):
            dst.copy_(src)
    return replace(content, config=stripped_config, layers=target.layer_state_dicts())
