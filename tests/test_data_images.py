"""16-bit images are scaled to 8 bits (never clipped at 255), whatever mode PIL opens them in."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from helpers.images import hand_png
from PIL import Image

from hyperlit.data.images import BadImage, decode_image, image_size


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return hand_png(w, h, 16, 2, zlib.compress(raw))


def to8(v: np.ndarray) -> np.ndarray:
    """The reference scaling: 0..65535 onto 0..255, rounded."""
    return np.floor(v.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)


def test_16bit_grey_png_mode_i16_is_scaled():
    v = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    buf = io.BytesIO()
    Image.fromarray(v).save(buf, "PNG")
    d = decode_image(buf.getvalue())
    rgb = np.asarray(d.rgb)
    assert all(np.array_equal(rgb[..., c], to8(v)) for c in range(3))
    assert "converted_16bit" in d.repairs


def test_dark_16bit_image_opened_as_mode_i_stays_dark():
    # A 16-bit PGM opens as mode "I" (not "I;16"): its values are 16-bit even when all are <= 255.
    v = np.full((4, 4), 200, dtype=np.uint16)
    data = b"P5\n4 4\n65535\n" + v.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(data)).mode == "I"
    d = decode_image(data)
    assert np.array_equal(np.asarray(d.rgb)[..., 0], to8(v)) and int(to8(v)[0, 0]) == 1


def test_32bit_integer_tiff_with_8bit_values_keeps_them():
    v = np.arange(16, dtype=np.int32).reshape(4, 4) * 17  # 0..255 in a 32-bit image: no depth to go by
    buf = io.BytesIO()
    Image.fromarray(v).save(buf, "TIFF")
    assert np.array_equal(np.asarray(decode_image(buf.getvalue()).rgb)[..., 0], v.astype(np.uint8))


def test_16bit_rgb_png_is_scaled_and_counted():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 65536, size=(8, 8, 3), dtype=np.uint16)
    d = decode_image(png16_rgb(v))
    got = np.asarray(d.rgb).astype(int)
    assert np.array_equal(got, v >> 8)  # PIL keeps the high byte: v // 256, within 1 of the rounded scaling
    assert np.abs(got - to8(v).astype(int)).max() <= 1 and got.max() > 200
    assert d.repairs == ["converted_16bit"]


def test_8bit_png_is_not_counted_as_16bit():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "PNG")
    assert decode_image(buf.getvalue()).repairs == []


def test_image_size_reads_the_header_with_the_same_kinds(tmp_path):
    ok = tmp_path / "ok.png"
    Image.new("RGB", (40, 30)).save(ok)
    assert image_size(ok) == (40, 30)
    with pytest.raises(BadImage) as e:
        image_size(ok, max_pixels=1000)
    assert e.value.kind == "decompression_bomb"
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"hello")
    for name, kind in (("empty.png", "zero_byte"), ("text.png", "not_an_image")):
        with pytest.raises(BadImage) as e:
            image_size(tmp_path / name)
        assert e.value.kind == kind
