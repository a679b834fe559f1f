"""Plain image folder -> crops in [-1, 1] for VAE-decoder training (no captions, no latents).

Images smaller than the crop are upscaled or skipped (``data.small_images``); unreadable files are skipped.
Both are counted and reported, and an empty result is an error naming ``data.path``.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SMALL_IMAGES = ("upscale", "skip")


@dataclass
class ScanReport:
    files: list[Path] = field(default_factory=list)
    bad: list[Path] = field(default_factory=list)
    small_skipped: list[Path] = field(default_factory=list)
    small_upscaled: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.files)} usable images ({self.small_upscaled} smaller than the crop, upscaled), "
            f"{len(self.small_skipped)} skipped as smaller than the crop, {len(self.bad)} unreadable files skipped"
        )


def scan_images(root: str | os.PathLike, resolution: int, small_images: str = "upscale") -> ScanReport:
    """Every readable image under ``root`` (sorted, recursive), with skips counted."""
    if small_images not in SMALL_IMAGES:
        raise ValueError(f"data.small_images={small_images!r} is not supported; allowed: {', '.join(SMALL_IMAGES)}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"data.path={str(root)!r}: not a folder")
    report = ScanReport()
    for p in sorted(base.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith(".") or not p.is_file():
            continue
        try:
            with Image.open(p) as im:
                im.verify()  # integrity check without decoding every pixel
                w, h = im.size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            log.warning("skipping unreadable image %s (%s)", p, e)
            report.bad.append(p)
            continue
        if min(w, h) < resolution:
            if small_images == "skip":
                report.small_skipped.append(p)
                continue
            report.small_upscaled += 1
        report.files.append(p)
    if not report.files:
        raise ValueError(
            f"data.path={str(root)!r}: no usable images at data.resolution={resolution} ({report.summary()})"
        )
    return report


def _to_tensor(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageCrops(Dataset):
    """Square crops of side ``resolution`` from image files, as float32 CHW in [-1, 1].

    ``fixed_crops``: the crop of image i is the same every epoch (position drawn from seed and i), so a cached
    posterior stays valid. ``random_crop=False`` takes the centre crop. ``resize_to`` first resizes the short
    side (the evaluation protocol of the Stability cards: short side 256, centre crop).
    """

    def __init__(
        self,
        files: list[Path],
        resolution: int,
        random_crop: bool = True,
        fixed_crops: bool = False,
        flip: bool = False,
        resize_to: int | None = None,
        seed: int = 0,
    ) -> None:
        self.files = list(files)
        self.resolution = resolution
        self.random_crop = random_crop
        self.fixed_crops = fixed_crops
        self.flip = flip and not fixed_crops  # a flipped image would not match its cached posterior
        self.resize_to = resize_to
        self.seed = seed
        self.load_failures = 0

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Image.Image:
        with Image.open(path) as im:
            im = im.convert("RGB")
        side = max(self.resolution, self.resize_to or 0)
        w, h = im.size
        if self.resize_to is not None or min(w, h) < self.resolution:
            scale = side / min(w, h)
            im = im.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC)
        return im

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            try:
                im = self._load(self.files[i])
                break
            except (OSError, ValueError) as e:  # truncated after the scan's header check
                self.load_failures += 1
                log.warning("skipping image %s that failed to decode (%s)", self.files[i], e)
        else:
            raise ValueError("no image in data.path could be decoded")
        w, h = im.size
        r = self.resolution
        if self.random_crop:
            rng = random.Random(self.seed * 1_000_003 + i) if self.fixed_crops else random
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        else:
            left, top = (w - r) // 2, (h - r) // 2
        im = im.crop((left, top, left + r, top + r))
        if self.flip and random.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"pixels": _to_tensor(im), "index": i}


class VAEImageDataModule(pl.LightningDataModule):
    """Train/val split of one image folder; the last ``val_count`` images of a seeded shuffle are validation."""

    def __init__(
        self,
        path: str,
        resolution: int = 256,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        val_count: int = 4,
        num_workers: int = 0,
        small_images: str = "upscale",
        random_crop: bool = True,
        flip: bool = False,
        resize_to: int | None = None,
        fixed_crops: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if resolution < 8 or resolution % 8:
            raise ValueError(f"data.resolution={resolution} must be a positive multiple of 8 (the VAE's factor)")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.path, self.resolution, self.batch_size = path, resolution, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_count, self.num_workers, self.small_images = val_count, num_workers, small_images
        self.random_crop, self.flip, self.resize_to = random_crop, flip, resize_to
        self.fixed_crops, self.seed = fixed_crops, seed
        self.report: ScanReport | None = None
        self.train_set: ImageCrops | None = None
        self.val_set: ImageCrops | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.report = scan_images(self.path, self.resolution, self.small_images)
        log.info("data.path=%s: %s", self.path, self.report.summary())
        files = list(self.report.files)
        random.Random(self.seed).shuffle(files)
        n_val = min(self.val_count, len(files) - 1)
        train, val = files[: len(files) - n_val], files[len(files) - n_val :]
        self.train_set = ImageCrops(
            train, self.resolution, self.random_crop, self.fixed_crops, self.flip, self.resize_to, self.seed
        )
        # validation: short side resized when asked, centre crop, same every time
        self.val_set = ImageCrops(val, self.resolution, random_crop=False, resize_to=self.resize_to)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(ds) >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        assert self.val_set is not None
        if len(self.val_set) == 0:
            return []
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)
