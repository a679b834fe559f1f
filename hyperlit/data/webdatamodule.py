"""LightningDataModule streaming webdataset shards (local paths, brace patterns, `pipe:` commands).

Workers decode and caption; `on_after_batch_transfer` (on the training device) VAE-encodes images that
have no precomputed `latent.npy`, applies latent sampling and scaling, encodes fixed prompts that have no
`context.npy`, and turns PNG alpha into the A1111 loss weight. Batches then follow the task contract.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import webdataset as wds

from hyperlit.data.captions import load_template
from hyperlit.data.device import encoders_on
from hyperlit.data.heldout import HeldOut, held_out_prompt
from hyperlit.data.options import DataOptions
from hyperlit.data.skips import SkipLog
from hyperlit.data.stream import EpochLoader, TrainerEpochs
from hyperlit.data.webdata import ShardStream, batches_per_rank

log = logging.getLogger(__name__)


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns and `::`-separated lists expanded; local files checked so typos fail at the door."""
    if isinstance(urls, str):
        raw = [urls]
    else:
        raw = [str(u) for u in urls]
    if not raw or any(not u.strip() for u in raw):
        raise ValueError(
            "data.urls is required: shard paths, a brace pattern like /d/shard-{000000..000009}.tar, or pipe: commands"
        )
    out: list[str] = []
    for u in raw:
        out += wds.shardlists.expand_urls(u)
    for u in out:
        local = not (u.startswith("pipe:") or "://" in u)
        if local and not Path(u).expanduser().is_file():
            raise FileNotFoundError(f"data.urls: shard {u!r} does not exist (after brace expansion of {raw})")
    return [str(Path(u).expanduser()) if not (u.startswith("pipe:") or "://" in u) else u for u in out]


class WebDataModule(TrainerEpochs, L.LightningDataModule):
    def __init__(
        self,
        urls: str | list[str],
        encoder: Any = None,
        epoch_length: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        path: str | None = None,  # accepted so data=webdataset can share folder.yaml's keys; unused
        **options: Any,
    ) -> None:
        super().__init__()
        del path
        if options.get("buckets"):
            raise ValueError("data.buckets=true is not supported with webdataset shards; use data=folder")
        self.opts = DataOptions(**options)
        self.urls_value = urls
        self.encoder = encoder
        if epoch_length is not None and (not isinstance(epoch_length, int) or epoch_length < 1):
            raise ValueError(f"data.epoch_length={epoch_length!r}; expected a positive number of samples or null")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer={shuffle_buffer!r}; expected an integer >= 0")
        self.epoch_length = epoch_length
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.template_lines = load_template(self.opts.template)
        self.skip_log = SkipLog()
        self.stream: ShardStream | None = None
        self.held_out: list[HeldOut] = []  # filled by setup(); every rank holds all of them

    @property
    def skipped(self) -> Counter[str]:
        return self.skip_log.counts

    def validate(self) -> None:
        """Errors at the door (before the model loads): shard URLs expand and local shards exist."""
        expand_urls(self.urls_value)

    def setup(self, stage: str | None = None) -> None:
        if self.stream is not None:
            return
        if self.encoder is None:
            raise ValueError("the data module needs `encoder=` (an SDComponents) to encode images and captions")
        urls = expand_urls(self.urls_value)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        workers = max(1, self.opts.num_workers)
        if self.resampled and self.epoch_length is None:
            raise ValueError("data.resampled=true streams endlessly; set data.epoch_length (samples per epoch)")
        if world > 1 and self.epoch_length is None:
            raise ValueError(
                f"data.epoch_length is required with {world} processes so every rank takes the same number of "
                "steps; set it to the number of samples per epoch"
            )
        if not self.resampled and len(urls) < world * workers:
            raise ValueError(
                f"data.urls: {len(urls)} shard(s) for {world} rank(s) x {workers} worker(s); need at least "
                f"{world * workers} (or set data.resampled=true, or lower data.num_workers)"
            )
        epoch_batches = batches_per_rank(self.epoch_length, self.opts.batch_size, world) if self.epoch_length else None
        self.stream = ShardStream(
            urls,
            batch_size=self.opts.batch_size,
            seed=self.opts.seed,
            rank=rank,
            world_size=world,
            epoch_batches=epoch_batches,
            resampled=self.resampled,
            shuffle=self.opts.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            resolution=self.opts.resolution,
            resize=self.opts.resize,
            template_lines=self.template_lines,
            name=self.opts.name,
            shuffle_tags=self.opts.shuffle_tags,
            tag_dropout=self.opts.tag_dropout,
            use_weight=self.opts.use_weight,
            vae_fingerprint=self.encoder.fingerprint("vae"),
            text_fingerprint=self.encoder.fingerprint("text_encoder"),
            max_image_pixels=self.opts.max_image_pixels,
        )
        if self.opts.val_count:
            self.held_out = self._read_held_out(urls[0])
            self.stream.exclude = frozenset(h.key for h in self.held_out)
        log.info(
            "data: %d shard(s) (%d images of the first held out for validation), rank %d/%d, %s batches per epoch",
            len(urls),
            len(self.held_out),
            rank,
            world,
            epoch_batches if epoch_batches is not None else "one pass of",
        )

    def _read_held_out(self, url: str) -> list[HeldOut]:
        """The first data.val_count usable samples of the first shard, at their posterior mean."""
        assert self.stream is not None
        # Never more than a quarter of the first shard, so a tiny set still trains (reads at most 4 x val_count).
        found = self.stream.first_samples(url, 4 * self.opts.val_count)
        items = found[: min(self.opts.val_count, len(found) // 4)]
        if len(items) < self.opts.val_count:
            log.warning(
                "data.val_count=%d: holding out %d image(s); the first shard %s has %s usable distinct images "
                "(at most a quarter is held out)",
                self.opts.val_count, len(items), url, len(found) if len(found) < 4 * self.opts.val_count else "more",
            )  # fmt: skip
        enc = self.encoder
        held = []
        with encoders_on(enc, getattr(self, "trainer", None)), torch.no_grad():
            for item in items:
                if "pixels" in item:
                    mean = enc.encode_images(item["pixels"].unsqueeze(0))[0]
                else:
                    mean = item["mean"].unsqueeze(0)
                latents = enc.scale_latents(mean.float().cpu())[0].float()
                prompt = held_out_prompt(self.template_lines, item["filewords"], self.opts.name, item["sha"])
                held.append(HeldOut(item["sha"], latents, item["filewords"], prompt))
        return held

    def train_dataloader(self) -> EpochLoader:
        if self.stream is None:
            self.setup("fit")
        return self.epoch_loader(self.stream, self.skip_log, self.opts.num_workers)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Finish a streamed batch on the device: latents, context and weight per the batch contract."""
        if not isinstance(batch, dict) or "sha" not in batch:
            return batch
        enc = self.encoder
        with torch.no_grad():
            if "pixels" in batch:
                pixels = batch.pop("pixels")
                mean, std = enc.encode_images(pixels.to(_device_of(enc, pixels)))
                mean, std = mean.to(pixels.device).float(), std.to(pixels.device).float()
            else:
                mean, std = batch.pop("mean").float(), batch.pop("std").float()
            shas = batch.pop("sha")
            mode = self.opts.latent_sampling
            if mode == "deterministic":
                raw = mean
            else:
                noise = torch.stack([self._noise(sha, mean.shape[1:], mode) for sha in shas]).to(mean.device)
                raw = mean + std * noise
            batch["latents"] = enc.scale_latents(raw).float()
            fixed = not (self.opts.shuffle_tags or self.opts.tag_dropout != 0)
            if fixed and "context" not in batch:
                text = enc.encode_prompts(batch["caption"])
                batch["context"] = text.context.to(mean.device).float()
                if text.pooled is not None:
                    batch["pooled"] = text.pooled.to(mean.device).float()
        if "alpha" in batch:
            batch["weight"] = _alpha_weight(batch.pop("alpha"), batch.pop("has_alpha"), batch["latents"].shape)
        return batch

    def _noise(self, sha: str, shape: torch.Size, mode: str) -> torch.Tensor:
        # once: the same draw for an image in every epoch (A1111 caches one sample); random: a new one each step.
        tag = f"once:{self.opts.seed}:{sha}" if mode == "once" else f"random:{random.getrandbits(63)}"
        g = torch.Generator().manual_seed(random.Random(tag).getrandbits(63))
        return torch.randn(tuple(shape), generator=g)


def _device_of(encoder: Any, fallback: torch.Tensor) -> torch.device:
    vae = getattr(encoder, "vae", None)
    device = getattr(vae, "device", None)
    return device if isinstance(device, torch.device) else fallback.device


def _alpha_weight(alpha: torch.Tensor, has_alpha: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    """A1111 use_weight on a batch: alpha resized (bicubic) to latent size, min-shifted, divided by its mean."""
    b, c, h, w = latent_shape
    small = F.interpolate(alpha.unsqueeze(1).float(), size=(h, w), mode="bicubic", align_corners=False)
    small = small.clamp(0, 1).squeeze(1)
    small = small - small.amin(dim=(1, 2), keepdim=True)
    mean = small.mean(dim=(1, 2), keepdim=True)
    ok = (mean > 0).squeeze(-1).squeeze(-1) & has_alpha.to(small.device)
    weight = torch.where(ok[:, None, None], small / mean.clamp_min(1e-12), torch.ones_like(small))
    return weight.unsqueeze(1).expand(b, c, h, w).contiguous()
