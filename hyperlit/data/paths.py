"""Where relative paths in data configs point.

A relative path is looked up in the current working directory first, then in the repository root (the
directory holding `conf/` and `datasets/`), so `data.path: datasets/sample` works from any directory.
"""

from __future__ import annotations

from pathlib import Path


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_path(value: str | Path, key: str, allowed: str = "an existing path") -> Path:
    if value is None or str(value).strip() == "":
        raise ValueError(f"{key} is required ({allowed}); set it on the command line, e.g. {key}=/path")
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p, repo_root() / p]
    for c in candidates:
        if c.exists():
            return c
    tried = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{key}={value!r}: not found (looked at {tried}); expected {allowed}")
