"""LightningDataModule for an A1111 dataset folder (images + same-stem .txt captions).

Built by Hydra as `instantiate(cfg.data, encoder=components, name=..., seed=...)`. prepare_data() encodes
everything that is not yet in the disk cache (so slow encoding never runs into distributed timeouts);
setup() loads from the cache, encoding in memory only what is still missing (e.g. no cache_dir).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch

from hyperlit.data.captions import load_template, varies_per_step
from hyperlit.data.device import encoders_on
from hyperlit.data.folder import SourceItem, scan_folder
from hyperlit.data.heldout import HeldOut, held_out_prompt, split_held_out
from hyperlit.data.options import DataOptions
from hyperlit.data.paths import resolve_path
from hyperlit.data.records import Encoded, encode_items, encode_prompts
from hyperlit.data.roundtrip import EncodedImage
from hyperlit.data.skips import SkipLog
from hyperlit.data.stream import BatchStream, EpochLoader, Sample, TrainerEpochs, _seed_int

log = logging.getLogger(__name__)


class FolderDataModule(TrainerEpochs, L.LightningDataModule):
    def __init__(self, path: str, encoder: Any = None, **options: Any) -> None:
        super().__init__()
        # Local rank 0 of every node fills that node's cache in prepare_data (nodes need not share a filesystem;
        # atomic writes make several writers on a shared one safe); the other ranks wait at Lightning's barrier
        # and only read it in setup().
        self.prepare_data_per_node = True
        self.opts = DataOptions(**options)
        self.path_value = path
        self.encoder = encoder
        self.template_lines = load_template(self.opts.template)  # fail at the door on a bad template
        self.skip_log = SkipLog()
        self.stream: BatchStream | None = None
        self.last_encoded: Encoded | None = None
        self.held_out: list[HeldOut] = []  # filled by setup(); every rank holds all of them

    @property
    def skipped(self) -> Counter[str]:
        """Skipped or repaired samples by kind (see hyperlit.data.skips)."""
        return self.skip_log.counts

    @property
    def cache_dir(self) -> str | None:
        return str(Path(self.opts.cache_dir).expanduser()) if self.opts.cache_dir else None

    def _root(self) -> Path:
        root = resolve_path(self.path_value, "data.path", "a folder of images with optional .txt captions")
        if not root.is_dir():
            raise NotADirectoryError(f"data.path={self.path_value!r}: {root} is not a directory")
        return root

    def _items(self, skips: SkipLog) -> list[SourceItem]:
        root = self._root()
        items = scan_folder(root, skips, self.opts.caption_extension)
        if not items:
            raise ValueError(
                f"data.path={self.path_value!r}: {root} holds no image files "
                f"(looked for .png .jpg .jpeg .webp .bmp .gif .tif .tiff)"
            )
        return items

    def _require_encoder(self) -> Any:
        if self.encoder is None:
            raise ValueError("the data module needs `encoder=` (an SDComponents) to encode images and captions")
        return self.encoder

    def _is_global_zero(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is None or trainer.is_global_zero

    def prepare_data(self) -> None:
        if not self.cache_dir:
            return
        enc = self._encode(SkipLog(verbose=False), write=True)
        log.info(
            "data: cache ready (%d images, %d VAE batches, %d text batches encoded)",
            len(enc.records),
            enc.vae_calls,
            enc.text_calls,
        )

    def validate(self) -> None:
        """Errors at the door (before the model loads): the folder exists and holds image files."""
        self._items(SkipLog(verbose=False))

    def _held_out_count(self, usable: int) -> int:
        """data.val_count, but never more than a quarter of the usable images: a small folder trains on all."""
        count = min(self.opts.val_count, usable // 4)
        if count < self.opts.val_count:
            log.warning(
                "data.val_count=%d: holding out %d of the %d usable images of %s (at most a quarter)",
                self.opts.val_count, count, usable, self.path_value,
            )  # fmt: skip
        return count

    def _encode(self, skips: SkipLog, write: bool) -> Encoded:
        encoder = self._require_encoder()
        with encoders_on(encoder, getattr(self, "trainer", None)):
            enc = encode_items(self._items(skips), encoder, self.opts, skips, self.cache_dir, write)
            if not enc.records:
                raise ValueError(
                    f"data.path={self.path_value!r}: no usable image; reasons with counts:\n{skips.describe()}"
                )
            encode_prompts(enc, encoder, self.opts, self.cache_dir, write)
        return enc

    def setup(self, stage: str | None = None) -> None:
        if self.stream is not None:
            return
        self.skip_log = SkipLog()
        enc = self._encode(self.skip_log, write=self._is_global_zero())
        self.last_encoded = enc
        train, held = split_held_out(enc.records, self._held_out_count(len(enc.records)))
        self.held_out = [self._held_out(r) for r in held]
        # kohya's repeat folders: an image of `10_x/` is 10 samples per epoch (held-out images have none)
        repeats = {item.where: item.repeats for item in self._items(SkipLog(verbose=False))}
        samples = [sample for r in train for sample in [self._finalize(r)] * repeats.get(r.where, 1)]
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.stream = BatchStream(
            samples,
            enc.contexts,
            pooled=enc.pooled,
            batch_size=self.opts.batch_size,
            buckets=self.opts.buckets,
            shuffle=self.opts.shuffle,
            seed=self.opts.seed,
            template_lines=self.template_lines,
            name=self.opts.name,
            shuffle_tags=self.opts.shuffle_tags,
            tag_dropout=self.opts.tag_dropout,
            use_weight=self.opts.use_weight,
            rank=rank,
            world_size=world,
        )
        log.info(
            "data: %d images from %s (%d held out for validation), %d batches per epoch, captions %s; bad input: %s",
            len(samples),
            self.path_value,
            len(self.held_out),
            len(self.stream),
            "vary per step" if varies_per_step(self.opts.shuffle_tags, self.opts.tag_dropout) else "fixed",
            self.skip_log.summary(),
        )

    def encoded_images(self) -> list[EncodedImage]:
        """Every usable image of the folder (training and held out) with its cached posterior mean, for the VAE
        round-trip check; empty before setup()."""
        records = self.last_encoded.records if self.last_encoded is not None else []
        return [EncodedImage(r.where, r.placement, r.mean) for r in records]

    def sweep_batches(self, count: int) -> list[dict[str, Any]]:
        """`count` training batches as one process draws epochs 0, 1, ... (the same on every rank), for the
        learning-rate range test; the training stream's own position is not touched."""
        if self.stream is None:
            self.setup("fit")
        assert self.stream is not None
        whole = copy.copy(self.stream)  # shares the samples; its own rank, world and epoch
        whole.rank, whole.world_size = 0, 1
        batches: list[dict[str, Any]] = []
        epoch = 0
        while len(batches) < count:
            whole.set_epoch(epoch)
            plan = whole.plan()
            if not plan:
                raise ValueError(f"data.path={self.path_value!r}: no training batch to sweep learning rates on")
            batches += [whole.collate(indices) for indices in plan[: count - len(batches)]]
            epoch += 1
        return batches

    def _held_out(self, rec: Any) -> HeldOut:
        with torch.no_grad():
            latents = self.encoder.scale_latents(rec.mean.unsqueeze(0))[0].float().cpu()
        prompt = held_out_prompt(self.template_lines, rec.caption, self.opts.name, rec.sha)
        return HeldOut(rec.sha, latents, rec.caption, prompt)

    def _finalize(self, rec: Any) -> Sample:
        """Scale into the model's latent space once, applying A1111's latent_sampling meaning."""
        scale = self.encoder.scale_latents
        with torch.no_grad():
            mean = scale(rec.mean.unsqueeze(0))[0].float()
            std = None
            if self.opts.latent_sampling == "once":
                g = torch.Generator().manual_seed(_seed_int(f"once:{self.opts.seed}:{rec.sha}"))
                sample = rec.mean + rec.std * torch.randn(rec.mean.shape, generator=g)
                mean = scale(sample.unsqueeze(0))[0].float()
            elif self.opts.latent_sampling == "random":
                # scale_latents is affine, so scale(mean + std*e) = scale(mean) + (scale(mean+std)-scale(mean))*e
                std = scale((rec.mean + rec.std).unsqueeze(0))[0].float() - mean
        return Sample(
            mean, std, rec.caption, rec.prompt, rec.context_index, rec.alpha, rec.sha, rec.placement.target,
            rec.placement.sizes(),
        )  # fmt: skip

    def train_dataloader(self) -> EpochLoader:
        if self.stream is None:
            self.setup("fit")
        assert self.stream is not None
        return self.epoch_loader(self.stream, self.skip_log, self.opts.num_workers)
