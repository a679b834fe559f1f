"""One test per kind of bad input: it is skipped or repaired, counted by kind, and loading continues."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers.fakes import FakeEncoder
from helpers.images import png_bytes
from PIL import Image

from hyperlit.data import FolderDataModule


def load(folder, **kw):
    kw.setdefault("resolution", 64)
    kw.setdefault("batch_size", 1)
    dm = FolderDataModule(path=str(folder), encoder=FakeEncoder(), cache_dir=None, shuffle=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm, list(dm.train_dataloader())


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def folder(image_folder):
    return image_folder(n=3)  # three good images so loading can continue


def assert_skipped(dm, batches, kind, good=3):
    assert dm.skipped[kind] == 1
    assert len(batches) == good and all(torch.isfinite(b["latents"]).all() for b in batches)


def test_zero_byte_image(folder):
    (folder / "empty.png").write_bytes(b"")
    assert_skipped(*load(folder), "zero_byte")


def test_truncated_image(folder):
    data = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG", quality=90)
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert_skipped(*load(folder), "truncated")


def test_truncated_png(folder):
    data = png_bytes((64, 64))
    (folder / "cut.png").write_bytes(data[: len(data) - 30])
    assert_skipped(*load(folder), "truncated")


def test_non_image_with_image_extension(folder):
    (folder / "notes.jpg").write_bytes(b"this is a text file, not a jpeg\n" * 10)
    assert_skipped(*load(folder), "not_an_image")


def test_decompression_bomb(folder):
    (folder / "big.png").write_bytes(png_bytes((200, 200)))
    dm, batches = load(folder, max_image_pixels=128 * 128)
    assert_skipped(dm, batches, "decompression_bomb")


def test_cmyk_converted(folder):
    (folder / "cmyk.jpg").write_bytes(encoded(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"))
    dm, batches = load(folder)
    assert dm.skipped["converted_cmyk"] == 1 and len(batches) == 4


def test_16bit_converted_with_scaling(folder, tmp_path):
    arr = np.full((64, 64), 32768, dtype=np.uint16)  # mid grey in 16 bits
    (folder / "deep.png").write_bytes(encoded(Image.fromarray(arr)))
    dm, batches = load(folder)
    assert dm.skipped["converted_16bit"] == 1 and len(batches) == 4
    from hyperlit.data.images import decode_image

    rgb = decode_image((folder / "deep.png").read_bytes()).rgb
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (128, 128, 128)  # not clipped to white


def test_palette_converted(folder):
    img = Image.new("RGB", (64, 64), (10, 120, 200)).convert("P", palette=Image.ADAPTIVE, colors=8)
    (folder / "pal.png").write_bytes(encoded(img))
    dm, batches = load(folder)
    assert dm.skipped["converted_palette"] == 1 and len(batches) == 4


def test_alpha_converted(folder):
    (folder / "rgba.png").write_bytes(encoded(Image.new("RGBA", (64, 64), (10, 20, 30, 128))))
    dm, batches = load(folder)
    assert dm.skipped["converted_alpha"] == 1 and len(batches) == 4


def test_non_utf8_caption_decoded_with_replacement(folder):
    (folder / "latin.png").write_bytes(png_bytes())
    (folder / "latin.txt").write_bytes(b"caf\xe9, cr\xe8me")
    dm, batches = load(folder, template="style_filewords")
    assert dm.skipped["caption_not_utf8"] == 1 and len(batches) == 4
    assert any("caf\ufffd, cr\ufffdme" in c for b in batches for c in b["caption"])


def test_empty_caption_kept_and_counted(folder):
    (folder / "blank.png").write_bytes(png_bytes())
    (folder / "blank.txt").write_text("  \n")
    dm, batches = load(folder)
    assert dm.skipped["caption_empty"] == 1 and len(batches) == 4


def test_nothing_usable_lists_reasons_with_counts(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"")
    (d / "b.png").write_bytes(b"")
    (d / "c.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError) as err:
        load(d)
    msg = str(err.value)
    assert "data.path" in msg and "zero_byte: 2" in msg and "not_an_image: 1" in msg


def test_summary_logged_after_each_epoch(folder, caplog):
    (folder / "empty.png").write_bytes(b"")
    dm, _ = load(folder)
    import logging

    with caplog.at_level(logging.INFO, logger="hyperlit.data"):
        list(dm.train_dataloader())
    assert any("epoch" in r.message and "zero_byte=1 (skipped)" in r.message for r in caplog.records)
