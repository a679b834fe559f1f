"""Validated data options shared by the folder and webdataset DataModules (errors name the `data.` key)."""

from __future__ import annotations

from dataclasses import dataclass

from hyperlit.data.folder import check_caption_extension
from hyperlit.data.images import DEFAULT_MAX_IMAGE_PIXELS

LATENT_SAMPLING = ("once", "deterministic", "random")
RESIZE_MODES = ("crop", "stretch")


def _fail(key: str, value: object, allowed: str) -> None:
    raise ValueError(f"data.{key}={value!r} is not allowed; expected {allowed}")


@dataclass
class DataOptions:
    resolution: int = 512
    resize: str = "crop"
    template: str = "style_filewords"
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    latent_sampling: str = "once"
    use_weight: bool = False
    batch_size: int = 1
    shuffle: bool = True
    num_workers: int = 0
    cache_dir: str | None = None
    buckets: bool = False
    bucket_step: int = 64
    bucket_min_size: int | None = None  # default resolution // 2
    bucket_max_size: int | None = None  # default resolution * 2
    bucket_max_area: int | None = None  # default resolution ** 2
    encode_batch_size: int = 8
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    seed: int = 0
    name: str = "hypernetwork"
    val_count: int = 0  # images held out for validation (the configs default to a few)
    caption_extension: str = ".txt"  # the caption file beside each image (kohya: .caption)

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 8 or self.resolution % 8:
            _fail("resolution", self.resolution, "a positive multiple of 8 (the VAE downsampling factor)")
        if self.resize not in RESIZE_MODES:
            _fail("resize", self.resize, f"one of {RESIZE_MODES}")
        if self.latent_sampling not in LATENT_SAMPLING:
            _fail("latent_sampling", self.latent_sampling, f"one of {LATENT_SAMPLING}")
        if not 0.0 <= float(self.tag_dropout) < 1.0:
            _fail("tag_dropout", self.tag_dropout, "a probability in [0, 1)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            _fail("batch_size", self.batch_size, "an integer >= 1")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            _fail("num_workers", self.num_workers, "an integer >= 0")
        if not isinstance(self.encode_batch_size, int) or self.encode_batch_size < 1:
            _fail("encode_batch_size", self.encode_batch_size, "an integer >= 1")
        if not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 1:
            _fail("max_image_pixels", self.max_image_pixels, "a positive integer")
        if not isinstance(self.bucket_step, int) or self.bucket_step < 8 or self.bucket_step % 8:
            _fail("bucket_step", self.bucket_step, "a positive multiple of 8")
        if self.bucket_min_size is None:
            self.bucket_min_size = max(self.bucket_step, self.resolution // 2)
        if self.bucket_max_size is None:
            self.bucket_max_size = self.resolution * 2
        if self.bucket_max_area is None:
            self.bucket_max_area = self.resolution**2
        if self.bucket_min_size > self.bucket_max_size:
            _fail("bucket_min_size", self.bucket_min_size, f"<= data.bucket_max_size ({self.bucket_max_size})")
        if self.bucket_max_area < self.bucket_min_size**2:
            _fail("bucket_max_area", self.bucket_max_area, f">= data.bucket_min_size**2 ({self.bucket_min_size**2})")
        self.tag_dropout = float(self.tag_dropout)
        check_caption_extension(self.caption_extension)
        if isinstance(self.val_count, bool) or not isinstance(self.val_count, int) or self.val_count < 0:
            _fail("val_count", self.val_count, "an integer >= 0 (0: no validation)")
