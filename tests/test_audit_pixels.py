"""Audit (issue 14, mutmut survivors of hyperlit.data.pixels): the VAE data's scan counts, the replacement of a
file that fails at load time, the batch plan, the resize-and-crop placement and collation, by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.images import encoded
from PIL import Image

from hyperlit.data import pixels as pixels_module
from hyperlit.data.buckets import plan_batches
from hyperlit.data.images import Placement, to_pixels
from hyperlit.data.pixels import ImageCrops, collate, scan_images
from hyperlit.data.skips import SkipEvent, SkipLog


def write_png(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    arr = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) * 5 % 251).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.write_bytes(encoded(img))
    return path


def test_scan_counts_each_bad_file_once_with_its_name_and_reason(tmp_path: Path, monkeypatch) -> None:
    good = write_png(tmp_path / "a.png", (64, 64))
    small = write_png(tmp_path / "b.png", (16, 24))
    (tmp_path / "c.png").write_bytes(b"")
    (tmp_path / "d.png").write_bytes(b"not an image")
    denied = write_png(tmp_path / "a0.png", (64, 64))  # before the others: the scan goes on after it
    write_png(tmp_path / ".hidden.png", (64, 64))
    (tmp_path / "notes.txt").write_text("x")
    real_image_size = pixels_module.image_size

    def image_size(path: Path, max_pixels: int):
        if path == denied:
            raise PermissionError("denied")
        return real_image_size(path, max_pixels)

    monkeypatch.setattr(pixels_module, "image_size", image_size)
    for small_images in ("skip", "upscale"):
        skips = SkipLog(verbose=False)
        for _ in range(2):  # a second scan (the next run's) counts nothing again
            files = scan_images(tmp_path, 32, small_images, skips)
        assert files == ([good] if small_images == "skip" else [good, small])
        assert dict(skips.counts)["unreadable"] == 1
        small_kind = "small_image" if small_images == "skip" else "upscaled_small_image"
        assert dict(skips.counts) == {"zero_byte": 1, "not_an_image": 1, "unreadable": 1, small_kind: 1}
        assert skips.examples == {
            small_kind: [f"{small}: 16x24, short side below data.resolution=32"],
            "zero_byte": [f"{tmp_path / 'c.png'}: file is empty"],
            "not_an_image": [f"{tmp_path / 'd.png'}: not a readable image format"],
            "unreadable": [f"{denied}: denied"],
        }


def crops(files: list[Path], **kw) -> ImageCrops:
    return ImageCrops(files, 32, **kw)


def test_defaults_plan_every_file_in_order_with_a_random_crop(tmp_path: Path) -> None:
    files = [write_png(tmp_path / f"{i}.png", (48, 40)) for i in range(3)]
    ds = crops(files)
    assert ds.plan() == [[0], [1], [2]] and len(ds) == 3
    item = ds[1]
    img = Image.open(files[1]).convert("RGB")
    p = ds.placement(img.size, 1)
    assert p.resized == (48, 40) and 0 <= p.crop[0] <= 16 and 0 <= p.crop[1] <= 8
    assert torch.equal(item["pixels"], to_pixels(img, p)) and item["index"] == 1 and item["_skipped"] == []
    # the crop is drawn per (seed, epoch, file): the same again, another in other epochs (and not always centred)
    assert crops(files).placement(img.size, 1) == p
    others = []
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        others.append(ds.placement(img.size, 1).crop)
    assert len(set(others) | {p.crop}) > 1 and any(c != (8, 4) for c in others)
    fixed = crops(files, fixed_crops=True, flip=True)
    first = fixed.placement(img.size, 1)
    fixed.set_epoch(3)
    assert fixed.placement(img.size, 1) == first
    assert torch.equal(fixed[1]["pixels"], to_pixels(img, first))  # fixed crops are never flipped


@pytest.mark.parametrize(("rank", "shuffle"), [(0, True), (1, True), (1, False)])
def test_plan_is_the_shared_plan_for_this_rank_and_epoch(tmp_path: Path, rank: int, shuffle: bool) -> None:
    files = [tmp_path / f"{i}.png" for i in range(5)]
    ds = crops(files, batch_size=2, shuffle=shuffle, seed=3, rank=rank, world_size=2)
    ds.set_epoch(4)
    expected = plan_batches({(0, 0): list(range(5))}, 2, drop_last=shuffle, shuffle=shuffle, seed=3, epoch=4,
                            rank=rank, world_size=2)  # fmt: skip
    assert ds.plan() == expected
    assert ds.plan(1) == plan_batches({(0, 0): list(range(5))}, 2, drop_last=shuffle, shuffle=shuffle, seed=3,
                                      epoch=1, rank=rank, world_size=2)  # fmt: skip
    # training drops the short last batch, unless it is the only one
    assert crops(files[:1], batch_size=2, shuffle=True).plan() == [[0]]


def test_a_file_failing_at_load_time_is_replaced_and_reported(tmp_path: Path) -> None:
    bad = tmp_path / "0.png"
    bad.write_bytes(b"not an image")
    gone = write_png(tmp_path / "1.png", (32, 32))
    gray = write_png(tmp_path / "2.png", (32, 32), mode="L")
    ds = crops([bad, gone, gray], random_crop=False)
    gone.unlink()  # vanished since the scan
    item = ds[0]
    assert item["index"] == 2
    assert item["_skipped"] == [
        SkipEvent("not_an_image", str(bad), "not a readable image format"),
        SkipEvent("unreadable", str(gone), f"[Errno 2] No such file or directory: '{gone}'"),
        SkipEvent("converted_grayscale", str(gray)),
    ]
    assert ds.bad == {0, 1}
    assert ds[1]["_skipped"] == [SkipEvent("converted_grayscale", str(gray))]  # known bad files are not retried
    empty = tmp_path / "3.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError) as info:
        crops([bad, empty])[0]
    assert str(info.value) == "data.path: none of the 2 images of this split could be decoded (not_an_image, zero_byte)"


def test_the_pixel_limit_applies_when_loading(tmp_path: Path) -> None:
    big = write_png(tmp_path / "big.png", (64, 64))
    fine = write_png(tmp_path / "fine.png", (32, 32))
    item = crops([big, fine], max_pixels=2000)[0]
    assert item["index"] == 1 and [e.kind for e in item["_skipped"]] == ["decompression_bomb"]


def test_placement_resizes_the_short_side_then_crops(tmp_path: Path) -> None:
    centre = crops([], random_crop=False)
    # short side 20 < 32: scaled by 1.6 to 32x64, centre crop (0, 16)
    assert centre.placement((20, 40), 0) == Placement((32, 32), (32, 64), (0, 16))
    # resize_to 48: 64x96 scaled by 0.75 to 48x72, centre crop (8, 20)
    assert crops([], random_crop=False, resize_to=48).placement((64, 96), 0) == Placement((32, 32), (48, 72), (8, 20))
    assert centre.placement((64, 96), 0) == Placement((32, 32), (64, 96), (16, 32))  # large enough: no resize


def test_collate_stacks_pixels_and_indices_and_joins_events() -> None:
    a = {"pixels": torch.zeros(3, 2, 2), "index": 4, "_skipped": [SkipEvent("truncated", "x")]}
    b = {"pixels": torch.ones(3, 2, 2), "index": 7, "_skipped": [SkipEvent("converted_alpha", "y")]}
    batch = collate([a, b])
    assert batch["pixels"].shape == (2, 3, 2, 2) and torch.equal(batch["pixels"][1], torch.ones(3, 2, 2))
    assert torch.equal(batch["index"], torch.tensor([4, 7]))
    assert batch["_skipped"] == [SkipEvent("truncated", "x"), SkipEvent("converted_alpha", "y")]


def test_default_seed_epoch_and_order_and_crops_inside_the_image(tmp_path: Path) -> None:
    files = [write_png(tmp_path / f"{i}.png", (48, 40)) for i in range(6)]
    assert crops(files).plan() == [[i] for i in range(6)]  # no shuffle by default
    explicit = crops(files, seed=0)
    explicit.set_epoch(0)
    for i in range(6):
        assert crops(files).placement((48, 40), i) == explicit.placement((48, 40), i)
    for epoch in range(10):  # every random crop lies inside the resized image
        explicit.set_epoch(epoch)
        for i in range(6):
            left, top = explicit.placement((48, 40), i).crop
            assert 0 <= left <= 16 and 0 <= top <= 8
    # odd margins: the centre crop rounds down to whole pixels
    assert crops([], random_crop=False).placement((33, 51), 0) == Placement((32, 32), (33, 51), (0, 9))


def test_flips_are_drawn_per_file_and_epoch(tmp_path: Path) -> None:
    files = [write_png(tmp_path / f"{i}.png", (32, 32)) for i in range(8)]
    a, b = crops(files, flip=True, random_crop=False), crops(files, flip=True, random_crop=False)
    plain = crops(files, random_crop=False)
    flipped = []
    for i in range(8):
        pixels = a[i]["pixels"]
        assert torch.equal(pixels, b[i]["pixels"])  # the same draw in another process
        flipped.append(torch.equal(pixels, plain[i]["pixels"].flip(-1)))
        assert flipped[-1] or torch.equal(pixels, plain[i]["pixels"])
    assert 0 < sum(flipped) < 8


def test_counting_loader_passes_batches_through_and_merges_their_events(tmp_path: Path) -> None:
    from hyperlit.data.pixels import CountingLoader

    files = [write_png(tmp_path / f"{i}.png", (32, 32), mode="L") for i in range(4)]
    skips = SkipLog(verbose=False)
    loader = CountingLoader(crops(files, batch_size=2), skips=skips, num_workers=0, pin_memory=False)
    batches = list(loader)
    assert [b["pixels"].shape for b in batches] == [(2, 3, 32, 32)] * 2
    assert all("_skipped" not in b for b in batches)
    assert dict(skips.counts) == {"converted_grayscale": 4}
    assert CountingLoader(crops(files), skips=skips, num_workers=1).num_workers == 1
