"""Atomic file output: every file hyperlit writes goes to a temporary name first and is renamed into place."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block completes.

    The temporary file lives in the same directory so ``os.replace`` is an atomic rename on POSIX and an
    interrupted write never leaves a half-written file under the final name. ``suffix`` keeps an extension
    for writers that infer the format from it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name that is not created here: the writer creates it, so it gets the usual permissions
    # (mkstemp would make it 0600 and the final file unreadable to others).
    unique = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
    tmp = target.parent / f".{target.name}.{unique}{suffix if suffix is not None else '.tmp'}"
    try:
        yield tmp
        # Some writers (safetensors' Rust writer) still create their file 0600: give every output the permissions
        # a plain open() would, so files written for other users (a shared A1111 models folder) stay readable.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
