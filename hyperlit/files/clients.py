"""Which client reads which hypernetwork file, and the file names that say so.

A1111 lists `**/*.pt` and ComfyUI reads `.pt` too; our `.safetensors` is hyperlit's own (A1111 does not list it, and
ComfyUI, which lists any `.safetensors`, finds no width entries in it and silently applies nothing), so its name
carries `.hyperlit`. Runs whose final `.pt` makes ComfyUI build Dropout layers (see :mod:`hyperlit.files.comfyui`)
also write `<name>.comfyui.pt`, an inference copy without Dropout slots, because ComfyUI runs them at inference.
"""

from __future__ import annotations

from pathlib import Path

COMFYUI_COPY = ".comfyui.pt"  # <name>.comfyui.pt: the copy to give ComfyUI when it would build Dropout layers
HYPERLIT_SAFETENSORS = ".hyperlit.safetensors"  # <name>.hyperlit.safetensors: hyperlit's pickle-free copy
_CLIENT_TAGS = (".comfyui", ".hyperlit")


def comfyui_advice(name: str, comfyui_dropout: bool) -> str:
    """What to give ComfyUI instead of a file for which it builds Dropout layers."""
    if not comfyui_dropout:
        return ""
    return (
        f"; give ComfyUI the inference copy {name}{COMFYUI_COPY} (written next to the final .pt, or: hyperlit "
        "convert --strip-dropout)"
    )


def base_name(path: str | Path) -> str:
    """The network's name for a file: its stem without a client tag (`style.comfyui.pt` -> `style`)."""
    stem = Path(path).stem
    for tag in _CLIENT_TAGS:
        if stem.endswith(tag):
            return stem[: -len(tag)]
    return stem


def readers(path: str | Path) -> str:
    """Which clients read this file, for `hyperlit inspect`."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pt":
        return "A1111 (models/hypernetworks, <hypernet:name:1>) and ComfyUI (HypernetworkLoader); hyperlit"
    return (
        "hyperlit only: A1111 does not list .safetensors hypernetworks and ComfyUI would load it as a silent "
        "no-op (not a client file; `hyperlit convert` it to .pt for A1111 or ComfyUI)"
    )
