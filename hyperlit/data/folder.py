"""The A1111 dataset folder: images with optional same-stem .txt captions, read non-recursively."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyperlit.data.captions import decode_caption, filename_caption
from hyperlit.data.images import IMAGE_EXTENSIONS
from hyperlit.data.skips import SkipLog


@dataclass
class SourceItem:
    """One image with its caption; `data` is read lazily so a folder scan stays cheap."""

    where: str
    caption: str
    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


def read_caption(where: str, raw: bytes | None, stem: str, skips: SkipLog) -> str:
    """Caption from .txt bytes (if any) else from the file name; repairs are counted in `skips`."""
    if raw is None:
        caption = filename_caption(stem)
        if not caption:
            skips.add("caption_empty", where, "file name has no caption after removing leading numbers")
        return caption
    caption, replaced = decode_caption(raw)
    if replaced:
        skips.add("caption_not_utf8", where, "invalid UTF-8 replaced with U+FFFD")
    if not caption:
        skips.add("caption_empty", where, "caption file is empty")
    return caption


def scan_folder(root: Path, skips: SkipLog) -> list[SourceItem]:
    """Image files (by extension) in `root`, sorted by name; files that are not images are ignored."""
    items = []
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        txt = p.with_suffix(".txt")
        raw = txt.read_bytes() if txt.is_file() else None
        where = str(txt if raw is not None else p)
        items.append(SourceItem(where=str(p), caption=read_caption(where, raw, p.stem, skips), path=p))
    return items
