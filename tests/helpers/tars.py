"""Tar shards written member by member, for webdataset tests that need files make_shards would never write."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar at `path` holding `members` ((name, bytes) pairs, in order); returns the path as a webdataset URL."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)
