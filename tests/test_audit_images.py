"""Audit (issue 14, mutmut survivors of hyperlit.data.images and hyperlit.data.skips): placements, crops and
pixels against hand computations, A1111's use_weight map, colour-mode repairs, error kinds and the skip summary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.images import encoded
from PIL import Image

from hyperlit.data.images import (
    Placement,
    _rawmode,
    _read_error_kind,
    _to_rgb,
    alpha_map,
    decode_image,
    place,
    to_pixels,
    weight_from_alpha,
)
from hyperlit.data.skips import SkipLog


def ramp(size: tuple[int, int]) -> Image.Image:
    w, h = size
    arr = (np.arange(w * h * 3).reshape(h, w, 3) * 7 % 251).astype(np.uint8)
    return Image.fromarray(arr)


# --- place / to_pixels / alpha_map ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "mode", "expected"),
    [
        ((64, 32), (32, 32), "stretch", Placement((32, 32), (32, 32), (0, 0), (64, 32))),
        # cover: scale max(32/64, 32/32) = 1 -> 64x32, centre crop (16, 0)
        ((64, 32), (32, 32), "crop", Placement((32, 32), (64, 32), (16, 0), (64, 32))),
        # scale max(32/30, 32/50) = 1.0667 -> 32 x 53.3 (rounded 53), crop (0, 10)
        ((30, 50), (32, 32), "crop", Placement((32, 32), (32, 53), (0, 10), (30, 50))),
        # scale max(40/80, 24/24) = 1 -> 80x24, crop (20, 0)
        ((80, 24), (40, 24), "crop", Placement((40, 24), (80, 24), (20, 0), (80, 24))),
    ],
)
def test_place_by_hand(source, target, mode, expected) -> None:
    assert place(source, target, mode) == expected


def test_placement_sizes_are_sdxl_time_ids() -> None:
    # (original h, original w, crop top, crop left, target h, target w)
    assert Placement((40, 24), (48, 24), (4, 0), (64, 32)).sizes() == (32, 64, 0, 4, 24, 40)


def test_pixels_are_the_resized_crop_scaled_to_minus_one_one() -> None:
    img = ramp((80, 24))
    p = place(img.size, (40, 24), "crop")  # no resize, crop 20 px from the left
    expected = torch.from_numpy(np.asarray(img, dtype=np.float32)[:, 20:60]).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(to_pixels(img, p), expected)
    img = ramp((64, 64))
    p = place(img.size, (32, 32), "crop")  # resize only
    resized = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32)
    assert torch.equal(to_pixels(img, p), torch.from_numpy(resized).permute(2, 0, 1) / 127.5 - 1)
    img = ramp((32, 33))
    p = place(img.size, (32, 32), "crop")  # one row too many: crop (0, 0) still cuts it
    assert p.crop == (0, 0) and p.resized == (32, 33)
    expected = torch.from_numpy(np.asarray(img, dtype=np.float32)[:32]).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(to_pixels(img, p), expected)


def test_alpha_map_is_alpha_over_255_at_latent_size() -> None:
    alpha = Image.fromarray(np.tile(np.array([[0, 255]], dtype=np.uint8).repeat(16, axis=1), (32, 1)))  # 32x32
    p = place(alpha.size, (32, 32), "crop")
    a = alpha_map(alpha, p, (4, 2))  # latent w=4, h=2
    assert a.shape == (2, 4) and a.dtype == torch.float32
    expected = np.asarray(alpha.resize((4, 2), Image.BICUBIC), dtype=np.float32) / 255.0
    assert torch.equal(a, torch.from_numpy(expected))
    assert float(a[0, 0]) == 0.0 and float(a[0, -1]) == 1.0


def test_weight_from_alpha_is_a1111s_use_weight() -> None:
    assert torch.equal(weight_from_alpha(None, 4, (2, 3)), torch.ones(4, 2, 3))
    assert torch.equal(weight_from_alpha(torch.full((2, 3), 0.7), 4, (2, 3)), torch.ones(4, 2, 3))  # no NaN
    alpha = torch.tensor([[0.25, 0.75], [1.25, 0.75]])
    # shifted to min 0: [[0, .5], [1, .5]], mean 0.5 -> [[0, 1], [2, 1]], one copy per channel
    w = weight_from_alpha(alpha, 3, (2, 2))
    assert torch.equal(w, torch.tensor([[0.0, 1.0], [2.0, 1.0]]).expand(3, 2, 2))
    w[0, 0, 0] = 9.0  # the channels are separate memory, not views of one map
    assert float(w[1, 0, 0]) == 0.0


# --- colour modes ---------------------------------------------------------------------------------------


def tiff(img: Image.Image) -> bytes:
    return encoded(img, "TIFF")


def test_float_images_rescale_by_their_depth_and_clip() -> None:
    # an "F" image above 255 is taken as 16-bit: v / 65535 * 255, rounded; below 0 and above 65535 clipped
    values = np.array([[-5.0, 256.0, 65407.0, 70000.0]], dtype=np.float32)
    decoded = decode_image(tiff(Image.fromarray(values, mode="F")))
    assert decoded.repairs == ["converted_16bit", "converted_grayscale"]
    # 256 -> 1.5 -> 1; 65407 -> 254.502 + 0.5 -> 255 (254 if divided by 65536)
    assert np.asarray(decoded.rgb)[0, :, 0].tolist() == [0, 1, 255, 255]
    low = decode_image(tiff(Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32), mode="F")))
    assert np.asarray(low.rgb)[0, :, 0].tolist() == [0, 100, 255]  # max <= 255: already 8-bit values


def test_sixteen_bit_alpha_and_palette_alpha_modes_are_reported() -> None:
    for mode in ("RGBA", "LA"):
        decoded = _to_rgb(Image.new(mode, (2, 2)), sixteen_bit=True)
        assert decoded.repairs[0] == "converted_16bit" and decoded.alpha is not None, mode
    pa = _to_rgb(Image.new("PA", (2, 2)))
    assert pa.repairs == ["converted_palette"] and pa.alpha is not None and pa.rgb.mode == "RGB"
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette entry 0 (red) is transparent
    decoded = _to_rgb(palette)
    assert decoded.repairs == ["converted_palette"]
    assert list(decoded.alpha.getdata()) == [0, 255] and list(decoded.rgb.getdata()) == [(255, 0, 0), (0, 0, 255)]


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("image file is truncated (3 bytes not processed)", "truncated"),
        ("broken data stream when reading image file", "truncated"),
        ("Unexpected End Of File", "truncated"),
        ("cannot identify image mode", "unreadable"),
    ],
)
def test_read_error_kinds(message, kind) -> None:
    assert _read_error_kind(OSError(message)) == kind


def test_raw_modes_from_tile_arguments() -> None:
    assert _rawmode("RGB;16") == "RGB;16"
    assert _rawmode(("I;16B", 0, 1)) == "I;16B"
    assert _rawmode(()) == "" and _rawmode(None) == "" and _rawmode(["RGB;16"]) == ""


# --- the skip summary -----------------------------------------------------------------------------------


def test_describe_lists_kinds_with_examples_and_says_when_nothing_was_found() -> None:
    assert SkipLog().describe() == "  (no files were found)"
    skips = SkipLog(verbose=False)
    skips.add("truncated", "a.png", "cut")
    skips.add("truncated", "b.png")
    skips.merge({"not_an_image": 2})  # counts from a stream: no examples
    assert skips.describe() == "  not_an_image: 2  e.g. \n  truncated: 2  e.g. a.png: cut; b.png"


def png_16bit(width: int, height: int, colour_type: int, samples: list[int]) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGBA or LA): `samples` per pixel, big-endian."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"".join(struct.pack(">H", s) for s in samples) * width
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("colour_type", "samples"), [(6, [0x8000, 0x4000, 0xFF00, 0xFFFF]), (4, [0x8000, 0xFFFF])])
def test_sixteen_bit_files_with_alpha_are_reported(colour_type, samples) -> None:
    decoded = decode_image(png_16bit(2, 2, colour_type, samples))  # RGBA;16 and LA;16
    assert decoded.repairs == ["converted_16bit", "converted_alpha"]
    assert np.asarray(decoded.rgb)[0, 0, 0] == 0x80  # the high byte: scaled, not clipped


def test_image_errors_carry_kind_and_detail(tmp_path) -> None:
    from hyperlit.data.images import BadImage, image_size

    error = BadImage("truncated", "cut short")
    assert str(error) == "truncated: cut short" and (error.kind, error.detail) == ("truncated", "cut short")
    with pytest.raises(BadImage) as info:
        decode_image(b"")
    assert (info.value.kind, info.value.detail) == ("zero_byte", "file is empty")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(BadImage) as info:
        image_size(empty)
    assert (info.value.kind, info.value.detail) == ("zero_byte", "file is empty")
    ten = encoded(ramp((10, 10)))
    assert decode_image(ten, max_pixels=100).rgb.size == (10, 10)  # at the limit: allowed
    with pytest.raises(BadImage) as info:
        decode_image(ten, max_pixels=99)
    assert (info.value.kind, info.value.detail) == ("decompression_bomb", "10x10 pixels is above the limit of 99")
    with pytest.raises(BadImage) as info:
        decode_image(ten[:-40])  # the IDAT cut: the header is fine, the pixels are not
    assert info.value.kind == "truncated" and info.value.detail, info.value.detail


# --- SkipLog --------------------------------------------------------------------------------------------


def test_skip_log_counts_examples_levels_and_summary(caplog) -> None:
    import logging

    from hyperlit.data.skips import SkipEvent

    skips = SkipLog()
    with caplog.at_level(logging.DEBUG, logger="hyperlit.data.skips"):
        for i in range(4):
            skips.add("truncated", f"{i}.png", "cut" if i == 0 else "")
        skips.add("converted_alpha", "a.png")
    assert skips.examples == {"truncated": ["0.png: cut", "1.png", "2.png"], "converted_alpha": ["a.png"]}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "data: truncated 0.png cut"),
        (logging.WARNING, "data: truncated 1.png "),
        (logging.WARNING, "data: truncated 2.png "),
        (logging.WARNING, "data: truncated 3.png "),
        (logging.INFO, "data: converted_alpha a.png "),
    ]
    assert skips.summary() == "converted_alpha=1 (repaired), truncated=4 (skipped)"
    assert SkipLog().summary() == "no bad input"
    quiet = SkipLog(verbose=False)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="hyperlit.data.skips"):
        quiet.merge([SkipEvent("truncated", "x.png", "cut"), SkipEvent("truncated", "x.png", "cut")])
        quiet.merge({"not_an_image": 3})
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]  # one event counted, logged quietly
    assert dict(quiet.counts) == {"truncated": 1, "not_an_image": 3}
    assert quiet.examples == {"truncated": ["x.png: cut"]}


def png_header_only(width: int, height: int, crc_ok: bool = True) -> bytes:
    """A PNG whose pixel data is empty: enough for PIL to open it (header) but not to decode it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes, flip: int = 0) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) ^ flip)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header, 0 if crc_ok else 1) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))  # fmt: skip


def test_header_errors_and_pil_bomb_warnings_keep_their_reason(monkeypatch) -> None:
    from hyperlit.data.images import BadImage

    with pytest.raises(BadImage) as info:
        decode_image(png_header_only(8, 8, crc_ok=False))  # PIL cannot identify it
    assert (info.value.kind, info.value.detail) == ("not_an_image", "not a readable image format")
    # 100 Mpx: above PIL's own warning limit (89.5 Mpx) while opening, before any pixel or our own limit
    with pytest.raises(BadImage) as info:
        decode_image(png_header_only(10_000, 10_000), max_pixels=10**9)
    assert info.value.kind == "decompression_bomb"
    assert info.value.detail.startswith("Image size (100000000 pixels) exceeds limit"), info.value.detail
    with pytest.raises(BadImage) as info:
        decode_image(encoded(ramp((16, 16)))[:-30])
    assert _read_error_kind(OSError(info.value.detail)) == "truncated"  # the detail carries PIL's reason

    def failing_open(fp):  # noqa: ANN001 - a read error while PIL reads the header
        raise OSError("broken data stream when reading image file")

    monkeypatch.setattr(Image, "open", failing_open)
    with pytest.raises(BadImage) as info:
        decode_image(b"header")
    assert (info.value.kind, info.value.detail) == ("truncated", "broken data stream when reading image file")


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_sixteen_bit_grey_modes_scale_by_65535(mode) -> None:
    decoded = _to_rgb(Image.new(mode, (2, 1), 100))  # 16-bit even when dark: 100 / 65535 * 255 -> 0
    assert decoded.repairs == ["converted_16bit", "converted_grayscale"]
    assert np.asarray(decoded.rgb)[0, 0, 0] == 0
    assert np.asarray(_to_rgb(Image.new(mode, (2, 1), 1000)).rgb)[0, 0, 0] == 4  # 3.89 rounded


def test_integer_images_just_above_eight_bit_and_negative_floats() -> None:
    at_256 = _to_rgb(Image.fromarray(np.array([[256.0, 0.0]], dtype=np.float32), mode="F"))
    assert np.asarray(at_256.rgb)[0, :, 0].tolist() == [1, 0]  # 256 > 255: 16-bit scale, 1.5 -> 1
    negative = _to_rgb(Image.fromarray(np.array([[-1000.0, 65535.0]], dtype=np.float32), mode="F"))
    assert np.asarray(negative.rgb)[0, :, 0].tolist() == [0, 255]  # clipped at 0, not wrapped


def test_other_modes_with_alpha_or_grey() -> None:
    assert _to_rgb(Image.new("RGBA", (2, 2))).repairs == ["converted_alpha"]  # 8-bit unless told otherwise
    assert _to_rgb(Image.new("1", (2, 2))).repairs == ["converted_grayscale"]
    decoded = _to_rgb(Image.new("RGBa", (2, 2)))  # premultiplied alpha
    assert decoded.repairs == ["converted_alpha"] and decoded.alpha is not None
    grey = Image.new("L", (2, 1), 0)
    grey.putpixel((1, 0), 200)
    grey.info["transparency"] = 0  # grey level 0 is transparent
    decoded = _to_rgb(grey)
    assert decoded.repairs == ["converted_grayscale", "converted_alpha"] and list(decoded.alpha.getdata()) == [0, 255]
    rgb = Image.new("RGB", (2, 1), (255, 0, 0))
    rgb.putpixel((1, 0), (0, 0, 255))
    rgb.info["transparency"] = (255, 0, 0)
    decoded = _to_rgb(rgb)
    assert decoded.repairs == ["converted_alpha"] and list(decoded.alpha.getdata()) == [0, 255]


def test_every_occurrence_counts_unless_once() -> None:
    skips = SkipLog(verbose=False)
    skips.add("truncated", "a.png")
    skips.add("truncated", "a.png")  # a stream meets the same bad sample again: counted again
    skips.add("zero_byte", "b.png", once=True)
    skips.add("zero_byte", "b.png", once=True)
    assert dict(skips.counts) == {"truncated": 2, "zero_byte": 1}
