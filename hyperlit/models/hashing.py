"""Hashes that identify a base model: A1111's checkpoint short hash and content digests for cache keys."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

_CHUNK = 1 << 20
_file_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, cached per process by (path, size, mtime) since SD files are GBs."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        _file_hashes[key] = h.hexdigest()
    return _file_hashes[key]


def a1111_short_hash(path: str | os.PathLike) -> str:
    """A1111's checkpoint short hash (v1.x): first 10 hex chars of the sha256 of the whole file."""
    return file_sha256(path)[:10]


def folder_sha256(folder: str | os.PathLike, subfolders: Iterable[str]) -> str:
    """sha256 over (relative path, file sha256) of every file under the given subfolders, in sorted order.

    A diffusers folder has no single file for A1111's hash; this stands in for it and changes whenever any
    weight or config byte of those components changes, wherever the folder lives.
    """
    root = Path(folder)
    h = hashlib.sha256()
    for sub in subfolders:
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(root).as_posix().encode())
                h.update(file_sha256(p).encode())
    return h.hexdigest()


def _public_config(config: Any) -> dict:
    """Config as a plain dict without bookkeeping keys (`_name_or_path`, library versions) that vary by location."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}


def update_with_module(h: Any, module: torch.nn.Module) -> None:
    """Feed a module's config (if any) and every state-dict tensor (name, dtype, shape, bytes) to hash `h`."""
    config = getattr(module, "config", None)
    if config is not None:
        h.update(json.dumps(_public_config(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())


def modules_sha256(*modules: torch.nn.Module, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for m in modules:
        update_with_module(h, m)
    return h.hexdigest()
