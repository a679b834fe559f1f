"""The A1111 dataset folder: images with optional same-stem captions (``.txt``, or kohya's ``.caption`` with
``data.caption_extension``), read non-recursively, plus kohya's repeat folders: a subfolder ``10_mystyle/`` holds
images that each appear 10 times per epoch (other subfolders are not read, as A1111 reads none)."""

from __future__ import annotations

import re
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
    repeats: int = 1  # times per epoch (kohya's `<repeats>_<name>/` folders)

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


# kohya's repeat folder name: `<repeats>_<name>`
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def check_caption_extension(extension: str) -> str:
    """``data.caption_extension``: a dot and at least one more character, e.g. ``.txt`` or ``.caption``."""
    if not isinstance(extension, str) or not re.fullmatch(r"\.[^./\\]+", extension):
        raise ValueError(
            f"data.caption_extension: {extension!r} is not allowed; use a file extension with its dot, "
            "e.g. .txt (A1111) or .caption (kohya)"
        )
    return extension


def repeat_folders(root: Path) -> list[tuple[Path, int]]:
    """(folder, repeats): `root` itself once, then every `<repeats>_<name>/` subfolder; 0 repeats is an error."""
    folders = [(root, 1)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found = REPEAT_FOLDER.match(sub.name)
        if not found:
            continue
        repeats = int(found[1])
        if repeats < 1:
            raise ValueError(
                f"data.path: {sub.name}/ is not allowed; a repeat folder is <repeats>_<name> with repeats >= 1 "
                "(kohya's convention: 10_mystyle/ shows each of its images 10 times per epoch)"
            )
        folders.append((sub, repeats))
    return folders


def scan_folder(root: Path, skips: SkipLog, caption_extension: str = ".txt") -> list[SourceItem]:
    """Image files (by extension) in `root` and its repeat folders, sorted by name within each; files that are not
    images are ignored. A caption is the image's same-stem file with `caption_extension`."""
    check_caption_extension(caption_extension)
    items = []
    for folder, repeats in repeat_folders(root):
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            txt = p.with_suffix(caption_extension)
            raw = txt.read_bytes() if txt.is_file() else None
            where = str(txt if raw is not None else p)
            caption = read_caption(where, raw, p.stem, skips)
            items.append(SourceItem(where=str(p), caption=caption, path=p, repeats=repeats))
    return items
