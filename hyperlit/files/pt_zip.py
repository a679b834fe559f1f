"""The `.pt` container every A1111 release and `torch.load(mmap=True)` read: torch's zip format with only the
members A1111's oldest safety check allows (`<dir>/data.pkl`, `<dir>/version`, `<dir>/data/<n>`).

torch >= 2.1 also writes `byteorder`, `.format_version`, `.storage_alignment` and `.data/serialization_id`, which
A1111 releases before 07cf95c refuse ("bad file inside"); torch reads a zip without them (little-endian, the
default). The legacy (non-zip) serializer avoids them too, but `torch.load(mmap=True)` (ComfyUI's
`--mmap-torch-files`) cannot read it. Records are stored uncompressed, each aligned to 64 bytes as torch aligns
them, so mmap maps the tensors in place. Fixed timestamps and no serialization id: same content, same bytes.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

A1111_ZIP_MEMBER = re.compile(r"^[^/]+/(data\.pkl|version|data/\d+)$")
ALIGNMENT = 64
_LOCAL_HEADER = 30  # bytes of a zip local file header before the name and extra field
_PAD_HEADER = 4  # id + size of the padding extra field


def save_a1111_zip(obj: Any, path: str | Path) -> None:
    """`torch.save(obj)` in the zip format, keeping only the members every A1111 release accepts."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, open(path, "wb") as handle, zipfile.ZipFile(handle, "w") as dst:
        for info in src.infolist():
            if not A1111_ZIP_MEMBER.match(info.filename):
                continue
            member = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_STORED
            start = handle.tell() + _LOCAL_HEADER + len(info.filename.encode()) + _PAD_HEADER
            pad = -start % ALIGNMENT
            member.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad  # torch's own padding field id
            dst.writestr(member, src.read(info))
