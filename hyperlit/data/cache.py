"""Disk cache for VAE posteriors and text embeddings: one safetensors file per entry, named by its key.

Keys are SHA-256 digests of everything the value depends on (image bytes, model fingerprint, target size,
resize mode, crop), so any change of input or model misses instead of returning stale data. Writes are
atomic (temporary file + rename), so concurrent writers of the same entry and interrupted runs are safe; an
unreadable entry is reported, deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hyperlit.io import atomic_path

log = logging.getLogger(__name__)
FORMAT_VERSION = "1"


def make_key(kind: str, **parts: object) -> str:
    blob = json.dumps({"kind": kind, "v": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TensorCache:
    """`get`/`put` of small dicts of tensors (+ string metadata) under `root/<kind>/<ab>/<key>.safetensors`."""

    def __init__(self, root: str | Path, kind: str) -> None:
        self.root = Path(root).expanduser() / kind

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with safe_open(p, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            if meta.get("key") != key:
                raise ValueError("entry key does not match its file name")
            return tensors, meta
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            log.warning("cache: corrupt entry %s (%s); recomputing it", p, e)
            p.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        p = self.path(key)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        with atomic_path(p, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={**(meta or {}), "key": key})
