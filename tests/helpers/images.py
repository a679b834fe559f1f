"""Small image files for tests: solid-colour PNGs with captions, and PNGs written byte by byte."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    """The bytes of `img` saved in `fmt`, as a file on disk would hold them."""
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = (64, 64), colour=(200, 30, 30), mode: str = "RGB") -> bytes:
    return encoded(Image.new(mode, size, colour))


def rgba_half_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """Mid-grey RGBA whose left half is opaque (alpha 255) and right half transparent (alpha 0)."""
    img = Image.new("RGBA", size, (128, 128, 128, 0))
    img.paste((128, 128, 128, 255), (0, 0, size[0] // 2, size[1]))
    return encoded(img)


def write_image(folder: Path, stem: str, caption: str | None, size=(64, 64), colour=(200, 30, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.png"
    path.write_bytes(png_bytes(size, colour))
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return path


def make_folder(folder: Path, n: int = 6, size=(64, 64)) -> Path:
    """n solid-colour PNGs, each a different colour, with a caption file each ('tag<i>, colour <i>, shape')."""
    for i in range(n):
        write_image(folder, f"{i:02d}-img{i}", f"tag{i}, colour {i}, shape", size, (20 * i, 255 - 20 * i, 90))
    return folder


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def hand_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG assembled chunk by chunk, for files PIL cannot or will not write (16-bit RGB, lying headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
