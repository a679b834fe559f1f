"""Decoding images safely and turning them into model-sized pixel tensors in [-1, 1].

Bad files raise `BadImage(kind, detail)`; callers count the kind and move on. Unusual colour modes (CMYK,
16-bit, palette, alpha, grayscale) are converted to RGB and reported through `DecodedImage.repairs`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# PIL's own limit (about 89.5 Mpx); above it PIL only warns until twice the limit, we refuse at the limit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class BadImage(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class DecodedImage:
    rgb: Image.Image
    alpha: Image.Image | None  # 8-bit "L" band, kept for the use_weight loss weight
    repairs: list[str] = field(default_factory=list)


def _open(fp: io.BytesIO | Path, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse images above ``max_pixels``: no pixel is decoded yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression_bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise BadImage("not_an_image", "not a readable image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(_read_error_kind(e), str(e)) from e
    if img.width * img.height > max_pixels:
        img.close()
        raise BadImage("decompression_bomb", f"{img.width}x{img.height} pixels is above the limit of {max_pixels}")
    return img


def _read_error_kind(e: Exception) -> str:
    # PIL reports short reads as OSError("image file is truncated ...") or "broken data stream".
    msg = str(e)
    return "truncated" if ("truncated" in msg or "broken" in msg or "end of file" in msg.lower()) else "unreadable"


def image_size(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the header, with the same checks and kinds as `decode_image` short of decoding pixels."""
    if path.stat().st_size == 0:
        raise BadImage("zero_byte", "file is empty")
    with _open(path, max_pixels) as img:
        return img.size


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode fully (so truncation is found now, not in a worker) and convert to 8-bit RGB (+ alpha)."""
    if len(data) == 0:
        raise BadImage("zero_byte", "file is empty")
    img = _open(io.BytesIO(data), max_pixels)
    # The bit depth is only visible in the raw mode of the file's tiles, which load() discards.
    sixteen_bit = any(_rawmode(t.args).startswith(("I;16", "RGB;16", "RGBA;16", "LA;16")) for t in img.tile)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(_read_error_kind(e), str(e)) from e
    return _to_rgb(img, sixteen_bit)


def _rawmode(args: object) -> str:
    return args if isinstance(args, str) else str(args[0]) if isinstance(args, tuple) and args else ""


def _to_rgb(img: Image.Image, sixteen_bit: bool = False) -> DecodedImage:
    repairs: list[str] = []
    mode = img.mode
    if sixteen_bit and mode in ("RGB", "RGBA", "LA"):
        # PIL decodes 16-bit RGB(A) PNGs to 8 bits by keeping the high byte (v // 256): scaled, not clipped.
        repairs.append("converted_16bit")
    if mode == "P" or mode == "PA":
        repairs.append("converted_palette")
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("RGB") clips 16-bit values at 255, turning most images white; rescale instead.
        repairs.append("converted_16bit")
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit files scale by 65535 whatever their content (a dark 16-bit image must stay dark). "I"/"F" images
        # whose file does not say 16-bit (32-bit TIFFs) carry no depth: above 255 is taken as 16-bit, else 8-bit.
        hi = 65535.0 if mode.startswith("I;16") or sixteen_bit or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
        mode = "L"
    if mode == "CMYK":
        repairs.append("converted_cmyk")
    elif mode in ("L", "1"):
        repairs.append("converted_grayscale")
    alpha = None
    if mode in ("RGBA", "LA", "RGBa", "La") or (mode in ("RGB", "L") and "transparency" in img.info):
        if "converted_palette" not in repairs:
            repairs.append("converted_alpha")
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        # A1111 drops alpha without compositing: the RGB under transparent pixels is used as is.
        img = rgba
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    return DecodedImage(rgb=rgb, alpha=alpha, repairs=repairs)


@dataclass(frozen=True)
class Placement:
    """How an image of `source` size is mapped onto a `target` (w, h): resized size and crop offset."""

    target: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]  # (left, top) in resized pixels
    source: tuple[int, int] = (0, 0)  # (w, h) of the image before resizing

    def sizes(self) -> tuple[int, int, int, int, int, int]:
        """(original h, original w, crop top, crop left, target h, target w): what the model is told about this
        placement (SDXL's time_ids; see hyperlit.models.components.SIZE_COLUMNS)."""
        return (self.source[1], self.source[0], self.crop[1], self.crop[0], self.target[1], self.target[0])


def place(source: tuple[int, int], target: tuple[int, int], mode: str) -> Placement:
    """`crop`: scale so the image covers the target, then center crop; `stretch`: A1111's plain resize."""
    w, h = source
    tw, th = target
    if mode == "stretch":
        return Placement(target, (tw, th), (0, 0), (w, h))
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    return Placement(target, (rw, rh), ((rw - tw) // 2, (rh - th) // 2), (w, h))


def _apply(img: Image.Image, p: Placement) -> Image.Image:
    if img.size != p.resized:
        img = img.resize(p.resized, Image.BICUBIC)
    left, top = p.crop
    if (left, top) != (0, 0) or img.size != p.target:
        img = img.crop((left, top, left + p.target[0], top + p.target[1]))
    return img


def to_pixels(rgb: Image.Image, p: Placement) -> torch.Tensor:
    """3×H×W float32 in [-1, 1] (the range SD VAEs expect)."""
    arr = np.asarray(_apply(rgb, p), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


def alpha_map(alpha: Image.Image, p: Placement, latent_size: tuple[int, int]) -> torch.Tensor:
    """Alpha in [0, 1] at latent resolution (h×w): the raw material of A1111's use_weight loss weight."""
    a = _apply(alpha, p).resize(latent_size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(a, dtype=np.float32) / 255.0)


def weight_from_alpha(alpha: torch.Tensor | None, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A1111 use_weight: alpha shifted to min 0 and divided by its mean; ones when there is no alpha.

    A uniform alpha would divide by zero in A1111 (NaN loss); we return ones instead.
    """
    if alpha is None:
        return torch.ones(channels, size[0], size[1])
    w = alpha - alpha.min()
    mean = w.mean()
    if float(mean) <= 0.0:
        return torch.ones(channels, size[0], size[1])
    return (w / mean).unsqueeze(0).expand(channels, -1, -1).clone()
