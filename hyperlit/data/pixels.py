"""A plain image folder as square crops in [-1, 1] (the VAE task's data: no captions, no latents).

Every file goes through the one image-safety layer (hyperlit.data.images) and every skipped or repaired file is
counted by kind (hyperlit.data.skips), at two moments:

- the scan reads headers only (format, size, the decompression-bomb limit, smaller than the crop): cheap on a
  folder of millions of images, done once in the main process, so the split and the batch plan are known
  before training;
- the full decode happens when a crop is loaded, in DataLoader workers. A file that fails only there (e.g. a
  truncated PNG, whose header is fine) is replaced by the next decodable file of the list -- deterministic, and
  the batch keeps its size -- rather than decoding every file twice just to filter at scan time. The event
  travels with the batch (`_skipped`) to the main process, where each (kind, file) counts once however many
  epochs and workers meet it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from hyperlit.data.buckets import plan_batches
from hyperlit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    BadImage,
    Placement,
    decode_image,
    image_size,
    to_pixels,
)
from hyperlit.data.skips import SkipEvent, SkipLog
from hyperlit.data.stream import this_workers_share

SMALL_IMAGES = ("upscale", "skip")


def scan_images(
    root: Path,
    resolution: int,
    small_images: str,
    skips: SkipLog,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Path]:
    """Image files under `root` (recursive, sorted) whose header is usable; the others are counted in `skips`."""
    files = []
    for p in sorted(root.rglob("*")):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        try:
            w, h = image_size(p, max_pixels)
        except BadImage as e:
            skips.add(e.kind, str(p), e.detail, once=True)
            continue
        except OSError as e:  # unreadable file (permissions, vanished)
            skips.add("unreadable", str(p), str(e), once=True)
            continue
        if min(w, h) < resolution:
            detail = f"{w}x{h}, short side below data.resolution={resolution}"
            if small_images == "skip":
                skips.add("small_image", str(p), detail, once=True)
                continue
            skips.add("upscaled_small_image", str(p), detail, once=True)
        files.append(p)
    return files


class ImageCrops(IterableDataset):
    """Batches of square crops of side `resolution`, float32 CHW in [-1, 1], with the index of the file used.

    An IterableDataset like the hypernetwork stream: every rank computes the same plan from (seed, epoch) and
    takes its share, so Lightning injects no sampler and a resumed epoch continues the same plan. Crop position
    and flip are drawn from (seed, epoch, index), not from a process RNG, for the same reason.
    ``fixed_crops``: the crop of file i is the same every epoch (a cached posterior stays valid; no flips).
    ``random_crop=False``: centre crop. ``resize_to``: first resize the short side (the Stability cards' eval).
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
        *,
        batch_size: int = 1,
        shuffle: bool = False,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.files = list(files)
        self.resolution = resolution
        self.random_crop = random_crop
        self.fixed_crops = fixed_crops
        self.flip = flip and not fixed_crops  # a flipped image would not match its cached posterior
        self.resize_to = resize_to
        self.seed = seed
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.max_pixels = max_pixels
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.bad: set[int] = set()  # per process: files that failed to decode are not tried again

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        # Training drops the short last batch (as the DataLoader did), unless it would be the only one.
        return plan_batches(
            {(0, 0): list(range(len(self.files)))},
            self.batch_size,
            drop_last=self.shuffle and len(self.files) >= self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __len__(self) -> int:
        return len(self.plan(0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for indices in this_workers_share(self.plan()):
            yield collate([self[i] for i in indices])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One crop: of file `index`, or of the next decodable file when that one fails (see the module doc)."""
        events: list[SkipEvent] = []
        n = len(self.files)
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self.bad:
                continue
            where = str(self.files[i])
            try:
                decoded = decode_image(self.files[i].read_bytes(), self.max_pixels)
            except BadImage as e:
                events.append(SkipEvent(e.kind, where, e.detail))
            except OSError as e:  # vanished or unreadable since the scan
                events.append(SkipEvent("unreadable", where, str(e)))
            else:
                events += [SkipEvent(kind, where) for kind in decoded.repairs]
                pixels = to_pixels(decoded.rgb, self.placement(decoded.rgb.size, i))
                if self.flip and random.Random(f"flip:{self.seed}:{self.epoch}:{i}").random() < 0.5:
                    pixels = pixels.flip(-1)
                return {"pixels": pixels, "index": i, "_skipped": events}
            self.bad.add(i)
        kinds = sorted({e.kind for e in events})
        raise ValueError(f"data.path: none of the {n} images of this split could be decoded ({', '.join(kinds)})")

    def placement(self, size: tuple[int, int], i: int) -> Placement:
        """Resize (short side to `resize_to`, or up to the crop when smaller), then the crop of file i."""
        w, h = size
        r = self.resolution
        side = max(r, self.resize_to or 0)
        if self.resize_to is not None or min(w, h) < r:
            scale = side / min(w, h)
            w, h = max(side, round(w * scale)), max(side, round(h * scale))
        if self.random_crop:
            key = self.seed * 1_000_003 + i if self.fixed_crops else f"crop:{self.seed}:{self.epoch}:{i}"
            rng = random.Random(key)
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        else:
            left, top = (w - r) // 2, (h - r) // 2
        return Placement(target=(r, r), resized=(w, h), crop=(left, top))


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "_skipped": [e for it in items for e in it["_skipped"]],
    }


class CountingLoader(DataLoader):
    """Validation loader: merges the skip events that come with each batch (from workers) in this process."""

    def __init__(self, dataset: ImageCrops, *, skips: SkipLog, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._skips = skips

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            self._skips.merge(batch.pop("_skipped", []))
            yield batch
