"""Image-folder data of the VAE task: crops, small images upscaled or skipped, bad files skipped, all counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hyperlit.vae.data import ImageCrops, VAEImageDataModule, scan_images


def _folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(d / "big.png")
    Image.fromarray((rng.random((64, 32, 3)) * 255).astype(np.uint8)).save(d / "sub" / "tall.jpg")
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).convert("L").save(d / "small_gray.png")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "notes.txt").write_text("ignored")
    return d


def test_scan_counts_small_and_bad_files(tmp_path):
    d = _folder(tmp_path)
    up = scan_images(d, 32, "upscale")
    assert [p.name for p in up.files] == ["big.png", "small_gray.png", "tall.jpg"]
    assert up.small_upscaled == 1 and [p.name for p in up.bad] == ["broken.png"]
    skip = scan_images(d, 32, "skip")
    assert [p.name for p in skip.files] == ["big.png", "tall.jpg"] and len(skip.small_skipped) == 1
    assert "1 skipped as smaller than the crop, 1 unreadable" in skip.summary()


def test_scan_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path='.*nowhere'"):
        scan_images(tmp_path / "nowhere", 32)
    with pytest.raises(ValueError, match="data.small_images='crop'"):
        scan_images(tmp_path, 32, "crop")
    with pytest.raises(ValueError, match="no usable images at data.resolution=512"):
        scan_images(_folder(tmp_path), 512, "skip")


def test_crops_are_in_range_and_fixed_crops_repeat(tmp_path):
    files = scan_images(_folder(tmp_path), 32).files
    ds = ImageCrops(files, 32, random_crop=True, fixed_crops=True, seed=3)
    a, b = ds[2], ds[2]
    assert a["pixels"].shape == (3, 32, 32) and a["index"] == 2
    assert torch.equal(a["pixels"], b["pixels"])
    assert a["pixels"].min() >= -1 and a["pixels"].max() <= 1
    small = ds[1]["pixels"]  # the 16 px grey image, upscaled to 32 and converted to RGB
    assert small.shape == (3, 32, 32) and torch.equal(small[0], small[1])
    centre = ImageCrops(files, 32, random_crop=False)[0]["pixels"]
    with Image.open(files[0]) as im:
        ref = np.asarray(im.convert("RGB"))[4:36, 8:40]  # 40×48 image, centre 32×32
    assert torch.equal(centre, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1)


def test_datamodule_split_and_loaders(tmp_path):
    dm = VAEImageDataModule(str(_folder(tmp_path)), resolution=32, batch_size=2, val_count=1)
    dm.setup("fit")
    assert len(dm.train_set) == 2 and len(dm.val_set) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (2, 3, 32, 32) and batch["index"].shape == (2,)
    with pytest.raises(ValueError, match="data.resolution=30 must be a positive multiple of 8"):
        VAEImageDataModule(str(tmp_path), resolution=30)
