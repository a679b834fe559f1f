"""hyperlit's own ``.safetensors`` hypernetwork file: no pickle involved at all.

Tensors are keyed ``<width>.<0=K|1=V>.<A1111 key>`` and the architecture is JSON in the metadata.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hyperlit.files.clients import base_name
from hyperlit.files.content import HypernetworkFile, HypernetworkFileError
from hyperlit.hypernetwork import HypernetworkConfig
from hyperlit.io import atomic_path

SAFETENSORS_FORMAT = "hyperlit-hypernetwork"
LAYOUT_SAFETENSORS = "hyperlit safetensors"


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
        name=meta.get("name") or base_name(path),
        step=int(step) if step.isdigit() else 0,
        sd_checkpoint=meta.get("sd_checkpoint") or None,
        sd_checkpoint_name=meta.get("sd_checkpoint_name") or None,
        optional_info=meta.get("optional_info") or None,
        layout=LAYOUT_SAFETENSORS,
    )


def write_safetensors(path: str | Path, content: HypernetworkFile, name: str | None = None) -> Path:
    path = Path(path)
    content.name = name or base_name(path)
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
