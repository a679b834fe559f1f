"""LightningDataModule for the VAE task: one image folder, a seeded train/val split, crops in [-1, 1].

Built by Hydra from conf/vae.yaml's `data:` (`_target_: hyperlit.data.pixeldatamodule.PixelDataModule`).
Bad and repaired files are counted by kind in `skipped` (the same property the hypernetwork data modules
have), logged after each epoch by the EpochLoader and, by the runner, at the end of the run.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl

from hyperlit.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS
from hyperlit.data.paths import resolve_path
from hyperlit.data.pixels import SMALL_IMAGES, CountingLoader, ImageCrops, scan_images
from hyperlit.data.skips import SkipLog
from hyperlit.data.stream import EpochLoader, TrainerEpochs

log = logging.getLogger(__name__)


def _not_allowed(key: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"data.{key}={value!r} is not allowed; expected {allowed}")


class PixelDataModule(TrainerEpochs, pl.LightningDataModule):
    """Train/val split of one image folder; the last `val_count` images of a seeded shuffle are validation."""

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
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Errors at the door: every value is checked here, before any model loads.
        if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
            raise _not_allowed("resolution", resolution, "a positive multiple of 8 (the VAE's downsampling factor)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise _not_allowed("batch_size", batch_size, "an integer >= 1")
        if val_batch_size is not None and (not isinstance(val_batch_size, int) or val_batch_size < 1):
            raise _not_allowed("val_batch_size", val_batch_size, "null (= data.batch_size) or an integer >= 1")
        if not isinstance(val_count, int) or val_count < 0:
            raise _not_allowed("val_count", val_count, "an integer >= 0")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise _not_allowed("num_workers", num_workers, "an integer >= 0")
        if small_images not in SMALL_IMAGES:
            raise _not_allowed("small_images", small_images, f"one of {', '.join(SMALL_IMAGES)}")
        if resize_to is not None and (not isinstance(resize_to, int) or resize_to < 1):
            raise _not_allowed("resize_to", resize_to, "null or a positive integer (the short side before cropping)")
        if not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise _not_allowed("max_image_pixels", max_image_pixels, "a positive integer")
        self.path, self.resolution, self.batch_size = path, resolution, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_count, self.num_workers, self.small_images = val_count, num_workers, small_images
        self.random_crop, self.flip, self.resize_to = random_crop, flip, resize_to
        self.fixed_crops, self.max_image_pixels, self.seed = fixed_crops, max_image_pixels, seed
        self.skip_log = SkipLog()
        self.train_set: ImageCrops | None = None
        self.val_set: ImageCrops | None = None

    @property
    def skipped(self) -> Counter[str]:
        """Skipped or repaired files by kind (see hyperlit.data.skips), worker-side events included."""
        return self.skip_log.counts

    def _root(self) -> Path:
        root = resolve_path(self.path, "data.path", "a folder of images")
        if not root.is_dir():
            raise NotADirectoryError(f"data.path={self.path!r}: {root} is not a folder")
        return root

    def validate(self) -> None:
        """Errors at the door (before the model loads): the folder exists."""
        self._root()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = scan_images(self._root(), self.resolution, self.small_images, self.skip_log, self.max_image_pixels)
        if not files:
            raise ValueError(
                f"data.path={self.path!r}: no usable image at data.resolution={self.resolution} (looked for "
                f"{' '.join(IMAGE_EXTENSIONS)}); reasons with counts:\n{self.skip_log.describe()}"
            )
        random.Random(self.seed).shuffle(files)
        n_val = min(self.val_count, len(files) - 1)
        train, val = files[: len(files) - n_val], files[len(files) - n_val :]
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.train_set = ImageCrops(
            train, self.resolution, self.random_crop, self.fixed_crops, self.flip, self.resize_to, self.seed,
            batch_size=self.batch_size, shuffle=True, max_pixels=self.max_image_pixels, rank=rank, world_size=world,
        )  # fmt: skip
        # validation: short side resized when asked, centre crop, same every time
        self.val_set = ImageCrops(
            val, self.resolution, random_crop=False, resize_to=self.resize_to, seed=self.seed,
            batch_size=self.val_batch_size, max_pixels=self.max_image_pixels, rank=rank, world_size=world,
        )  # fmt: skip
        log.info(
            "data.path=%s: %d images for training, %d for validation; bad input: %s",
            self.path, len(train), len(val), self.skip_log.summary(),
        )  # fmt: skip

    def train_dataloader(self) -> EpochLoader:
        if self.train_set is None:
            self.setup("fit")
        return self.epoch_loader(self.train_set, self.skip_log, self.num_workers)

    def val_dataloader(self) -> CountingLoader | list:
        if self.val_set is None:
            self.setup("fit")
        assert self.val_set is not None
        if len(self.val_set) == 0:
            return []
        # Persistent workers are fine here (validation does not follow the epoch); the training EpochLoader
        # starts fresh workers each epoch so they see the new epoch's plan.
        return CountingLoader(
            self.val_set,
            skips=self.skip_log,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._on_cuda(),
        )
