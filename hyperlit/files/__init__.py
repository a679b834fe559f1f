"""Hypernetwork files by extension: A1111 ``.pt`` (:mod:`hyperlit.files.a1111`) or hyperlit's ``.safetensors``
(:mod:`hyperlit.files.safetensors`), both read into and written from one format-neutral
:class:`~hyperlit.files.content.HypernetworkFile`; and its conversion to and from a
:class:`~hyperlit.hypernetwork.Hypernetwork`, which itself knows no file format.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from hyperlit.files import a1111, safetensors
from hyperlit.files.content import HypernetworkFile, HypernetworkFileError
from hyperlit.hypernetwork import Hypernetwork

EXTENSIONS = (".pt", ".safetensors")

__all__ = [
    "EXTENSIONS",
    "HypernetworkFile",
    "HypernetworkFileError",
    "from_file_content",
    "load_hypernetwork",
    "read_file",
    "save_hypernetwork",
    "strip_dropout",
    "to_file_content",
    "write_file",
]


def _extension(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise HypernetworkFileError(
            f"{path}: extension {suffix or '(none)'!r} is not a hypernetwork format; allowed: {', '.join(EXTENSIONS)}"
        )
    return suffix


def read_file(path: str | Path) -> HypernetworkFile:
    path = Path(path)
    return a1111.read_pt(path) if _extension(path) == ".pt" else safetensors.read_safetensors(path)


def write_file(path: str | Path, content: HypernetworkFile, name: str | None = None) -> Path:
    """Write by extension; the stored ``name`` is ``name`` or the file's base name (``style.comfyui.pt`` -> style)."""
    path = Path(path)
    if _extension(path) == ".pt":
        return a1111.write_pt(path, content, name)
    return safetensors.write_safetensors(path, content, name)


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
    name: str | None = None,
) -> Path:
    """Save by extension; with ``optimizer_state`` a ``.pt`` also gets A1111's ``.pt.optim`` beside it. The file
    stores ``name`` (default: its base name)."""
    path = write_file(path, to_file_content(hn), name)
    if optimizer_state is not None and path.suffix.lower() == ".pt":
        a1111.write_optim(path, optimizer_state, optimizer_name)
    return path


def strip_dropout(content: HypernetworkFile) -> HypernetworkFile:
    """An inference copy without Dropout slots: renumbered keys, same eval-mode function.

    Dropout is the identity in eval mode and has no parameters, so removing its Sequential slots changes only the
    ``linear.<index>`` numbering, which loaders that rebuild the layers from the keys (ComfyUI) then read directly.
    """
    stripped_config = replace(content.config, dropout_structure=None, sizes=list(content.layers))
    source = from_file_content(content, source="input")
    target = Hypernetwork(stripped_config, sizes=list(content.layers), name=content.name)
    # Dropout has no parameters, so both modules list the same parameters in the same order.
    with torch.no_grad():
        for dst, src in zip(target.parameters(), source.parameters(), strict=True):
            dst.copy_(src)
    return replace(content, config=stripped_config, layers=target.layer_state_dicts(), metadata=None)
