"""The VAE task's image folder data: crops, the one image-safety layer, and bad files counted by kind."""

from __future__ import annotations

import io
import logging
import re
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from helpers.images import hand_png
from PIL import Image

from hyperlit.data.pixeldatamodule import PixelDataModule
from hyperlit.data.pixels import ImageCrops, scan_images
from hyperlit.data.skips import SkipLog
from hyperlit.runner import run
from hyperlit.tasks.vae.module import VAEDecoderTask


def huge_header_png(width: int = 30000, height: int = 30000) -> bytes:
    """A few hundred bytes whose IHDR claims width x height 8-bit RGB pixels (PIL refuses it on open)."""
    return hand_png(width, height, 8, 2, zlib.compress(b"\x00" * 64))


def gradient16(size: int = 32) -> np.ndarray:
    """16-bit grey values 0..65472, almost all above 255 (a clip at 255 would make the image white)."""
    return (np.arange(size * size, dtype=np.uint32).reshape(size, size) * (65536 // (size * size))).astype(np.uint16)


def noise(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def bad_folder(root):
    """5 good RGB images, 3 repaired ones, 1 that fails only when decoded, 3 refused at scan (2 bombs, 1 empty)."""
    d = root / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        noise(rng, 40, 40).save(d / ("sub" if i % 2 else ".") / f"good{i}.png")
    noise(rng, 40, 40).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(gradient16()).save(d / "deep.png")  # mode I;16
    buf = io.BytesIO()
    noise(rng, 40, 40).save(buf, "PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[:-30])  # header fine, pixel data short
    noise(rng, 48, 48).save(d / "bomb_small.png")  # 2304 px: above the test's max_image_pixels=2000
    (d / "bomb_header.png").write_bytes(huge_header_png())  # 900 Mpx: above any default limit too
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image extension: ignored, not counted")
    return d


EXPECTED = Counter(
    zero_byte=1,
    decompression_bomb=2,
    truncated=1,
    converted_cmyk=1,
    converted_16bit=1,
    converted_grayscale=1,  # the 16-bit image is grey
)


# ------------------------------------------------------------------ the whole run, through runner.run


@pytest.mark.parametrize("workers", [0, 2])
def test_vae_run_over_bad_files_finishes_and_reports_each_kind(tmp_path, monkeypatch, caplog, workers, vae_cfg):
    folder = bad_folder(tmp_path)
    seen: list[dict] = []
    modules: list[PixelDataModule] = []
    step = VAEDecoderTask.training_step
    setup = PixelDataModule.setup

    def recording_step(self, batch, batch_idx):
        seen.append({"pixels": batch["pixels"].clone(), "index": batch["index"].clone()})
        return step(self, batch, batch_idx)

    def recording_setup(self, stage=None):
        modules.append(self)
        return setup(self, stage)

    monkeypatch.setattr(VAEDecoderTask, "training_step", recording_step)
    monkeypatch.setattr(PixelDataModule, "setup", recording_setup)
    cfg = vae_cfg(
        f"data.path={folder}", "data.resolution=32", "data.batch_size=2", "data.val_count=2",
        f"data.num_workers={workers}", "++data.max_image_pixels=2000", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1", "callbacks.export.save_every=0", steps=3,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        run(cfg)

    dm = modules[-1]
    # 8 files pass the scan: 6 train (3 batches of 2, all seen in the 3 steps) and 2 validation (one batch)
    assert len(dm.train_set.files) == 6 and len(dm.val_set.files) == 2 and len(seen) == 3
    assert dm.skipped == EXPECTED
    epoch = [r.getMessage() for r in caplog.records if "epoch 0 done" in r.getMessage()]
    assert len(epoch) == 1 and "zero_byte=1 (skipped)" in epoch[0] and "decompression_bomb=2 (skipped)" in epoch[0]
    final = [r.getMessage() for r in caplog.records if "skipped or repaired samples by kind" in r.getMessage()]
    assert len(final) == 1
    for kind, n in EXPECTED.items():
        assert re.search(rf"{kind}\W+{n}\b", final[0]), (kind, final[0])
    assert (tmp_path / "run" / "vae" / "vae-ft.vae.safetensors").is_file()

    # the 16-bit image reaches the model scaled to 8 bits, not clipped at 255
    deep = [p.name for p in dm.train_set.files + dm.val_set.files].index("deep.png")
    expected = np.floor(gradient16().astype(np.float64) * 255.0 / 65535.0 + 0.5) / 127.5 - 1.0
    assert deep < len(dm.train_set.files), "the seeded split (seed 42) puts deep.png in training"
    got = [b["pixels"][j] for b in seen for j, i in enumerate(b["index"].tolist()) if i == deep]
    assert len(got) == 1
    for channel in got[0]:
        np.testing.assert_allclose(channel.numpy(), expected, atol=1e-6)
    assert float(torch.tensor(expected).max()) > 0.99 and float(torch.tensor(expected).min()) < -0.99


# ------------------------------------------------------------------ worker processes


def test_counts_from_two_workers_reach_the_main_process_exactly(tmp_path):
    dm = PixelDataModule(
        str(bad_folder(tmp_path)), resolution=32, batch_size=2, val_count=2, num_workers=2, max_image_pixels=2000
    )
    dm.setup("fit")
    scanned = Counter(dm.skipped)
    assert scanned == Counter(zero_byte=1, decompression_bomb=2)  # header problems: found by the scan
    for _ in range(3):  # three epochs: every file met three times, by changing workers, still counted once
        train = list(dm.train_dataloader())
        assert len(train) == 3 and all(b["pixels"].shape == (2, 3, 32, 32) for b in train)
        assert all("_skipped" not in b for b in train)
    val = list(dm.val_dataloader())
    assert len(val) == 1 and all("_skipped" not in b for b in val)
    assert dm.skipped == EXPECTED
    # decoding happened in the workers: the main process's datasets never met the truncated file
    assert dm.train_set.bad == set() and dm.val_set.bad == set()


def test_a_file_failing_at_load_time_is_replaced_by_the_next_one(tmp_path):
    d = bad_folder(tmp_path)
    skips = SkipLog()
    files = scan_images(d, 32, "upscale", skips, max_pixels=2000)
    cut = [p.name for p in files].index("cut.png")
    ds = ImageCrops(files, 32, random_crop=False)
    item = ds[cut]
    neighbour = ds[(cut + 1) % len(files)]  # deep.png, the next name
    assert item["index"] == neighbour["index"] == (cut + 1) % len(files)  # deterministic substitute
    assert torch.equal(item["pixels"], neighbour["pixels"])
    assert item["_skipped"][0].kind == "truncated" and item["_skipped"][0].where.endswith("cut.png")
    assert item["_skipped"][1:] == neighbour["_skipped"] and cut in ds.bad
    assert ds[cut]["_skipped"] == neighbour["_skipped"]  # the bad file is not decoded (nor reported) again
    only_bad = ImageCrops([files[cut]], 32)
    with pytest.raises(ValueError, match=r"data.path: none of the 1 images of this split could be decoded \(truncated"):
        only_bad[0]


# ------------------------------------------------------------------ scan, crops, split


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
    up = SkipLog()
    assert [p.name for p in scan_images(d, 32, "upscale", up)] == ["big.png", "small_gray.png", "tall.jpg"]
    assert up.counts == Counter(upscaled_small_image=1, not_an_image=1)
    skip = SkipLog()
    assert [p.name for p in scan_images(d, 32, "skip", skip)] == ["big.png", "tall.jpg"]
    assert skip.counts == Counter(small_image=1, not_an_image=1)
    assert "small_image=1 (skipped)" in skip.summary() and "upscaled_small_image=1 (repaired)" in up.summary()


def test_datamodule_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path='.*nowhere'"):
        PixelDataModule(str(tmp_path / "nowhere"), resolution=32).validate()
    with pytest.raises(ValueError, match="data.small_images='crop' is not allowed; expected one of upscale, skip"):
        PixelDataModule(str(tmp_path), small_images="crop")
    with pytest.raises(ValueError, match="data.resolution=30 is not allowed; expected a positive multiple of 8"):
        PixelDataModule(str(tmp_path), resolution=30)
    with pytest.raises(ValueError, match="data.batch_size=0 is not allowed; expected an integer >= 1"):
        PixelDataModule(str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="data.val_batch_size=0 is not allowed; expected null"):
        PixelDataModule(str(tmp_path), val_batch_size=0)
    with pytest.raises(ValueError, match="data.max_image_pixels=0 is not allowed"):
        PixelDataModule(str(tmp_path), max_image_pixels=0)
    dm = PixelDataModule(str(_folder(tmp_path)), resolution=512, small_images="skip")
    with pytest.raises(ValueError, match=r"no usable image at data.resolution=512(.|\n)*small_image: 3"):
        dm.setup("fit")


def test_crops_are_in_range_and_fixed_crops_repeat(tmp_path):
    files = scan_images(_folder(tmp_path), 32, "upscale", SkipLog())
    ds = ImageCrops(files, 32, random_crop=True, fixed_crops=True, seed=3)
    a, b = ds[2], ds[2]
    assert a["pixels"].shape == (3, 32, 32) and a["index"] == 2
    assert torch.equal(a["pixels"], b["pixels"])
    ds.set_epoch(5)
    assert torch.equal(a["pixels"], ds[2]["pixels"])  # fixed crops do not move with the epoch
    assert a["pixels"].min() >= -1 and a["pixels"].max() <= 1
    small = ds[1]["pixels"]  # the 16 px grey image, upscaled to 32 and converted to RGB
    assert small.shape == (3, 32, 32) and torch.equal(small[0], small[1])
    assert [e.kind for e in ds[1]["_skipped"]] == ["converted_grayscale"]
    centre = ImageCrops(files, 32, random_crop=False)[0]["pixels"]
    with Image.open(files[0]) as im:
        ref = np.asarray(im.convert("RGB"))[4:36, 8:40]  # 40×48 image, centre 32×32
    assert torch.equal(centre, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    flipped = ImageCrops(files, 32, random_crop=False, flip=True, seed=0)
    flips = [torch.equal(flipped[0]["pixels"], centre.flip(-1)) for flipped.epoch in range(8)]
    assert any(flips) and not all(flips)  # a coin per (seed, epoch, image)


def test_datamodule_split_and_loaders(tmp_path):
    dm = PixelDataModule(str(_folder(tmp_path)), resolution=32, batch_size=2, val_count=1)
    dm.setup("fit")
    assert len(dm.train_set.files) == 2 and len(dm.val_set.files) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (2, 3, 32, 32) and batch["index"].shape == (2,)
    assert set(batch) == {"pixels", "index"}
    assert [b["index"].tolist() for b in dm.val_dataloader()] == [[0]]


def test_epochs_follow_the_plan_and_differ(tmp_path):
    d = bad_folder(tmp_path)
    dm = PixelDataModule(str(d), resolution=32, batch_size=2, val_count=0, max_image_pixels=2000, seed=1)
    dm.setup("fit")
    epochs = [[b["index"].tolist() for b in dm.train_dataloader()] for _ in range(2)]
    files = dm.train_set.files
    cut = [p.name for p in files].index("cut.png")
    substitute = {i: i for i in range(len(files))} | {cut: (cut + 1) % len(files)}
    for epoch, loaded in enumerate(epochs):
        assert loaded == [[substitute[i] for i in b] for b in dm.train_set.plan(epoch)]
    assert len(epochs[0]) == 4 and epochs[0] != epochs[1]  # 8 files in batches of 2, a new order each epoch
