"""Streaming webdataset shards: decode, caption and batch in workers; encode on the device after transfer.

Pipeline per rank (webdataset 1.0 `DataPipeline`, every stage explicit):
  shard list (one pass, or endless passes shuffled per (seed, epoch, pass) identically on all ranks)
  → node split (rank r takes every world_size-th shard) → worker split (`wds.split_by_worker`)
  → tar expansion, one shard at a time (corrupt members and cut samples counted, not fatal) → sample shuffle
  buffer → decode → batch.
Resampled mode replaces the first three stages with `wds.ResampledShards`, seeded per rank and worker; it is an
error once every shard has had a complete draw with no usable sample (see `_DryShards`).
With an epoch length every rank yields exactly the same number of batches (DDP cannot hang); without one
the epoch is a single pass (single process only) that yields every usable sample once, so the last batch of each
worker may be short.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from hyperlit.data.cache import sha256_bytes
from hyperlit.data.captions import make_prompt
from hyperlit.data.folder import read_caption
from hyperlit.data.images import BadImage, decode_image, place, to_pixels
from hyperlit.data.records import fixed_prompt_rng
from hyperlit.data.skips import SkipLog

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class _WorkerSeed:
    """Picklable per-(rank, worker) seed for ResampledShards (does not rely on RANK being exported)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self) -> int:
        info = get_worker_info()
        return self.rank * 1000 + (info.id if info is not None else 0)


class _DryShards:
    """Resampled mode's end test: the shards that had a complete draw, every sample of it decoded, while no sample
    of the stream was usable. A shard's content is fixed, so a draw with nothing usable means every draw of it has
    nothing; once every shard is dry the endless stream can never yield. Decoding lags reading (the sample shuffle
    buffer sits between them, out of order), so a draw counts only when its last sample is decoded, never when it
    is read."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = frozenset(urls)
        self.drawn = 0
        self.sizes: dict[int, tuple[str, int]] = {}  # draw → (url, samples it yielded), once its shard is read
        self.decoded: Counter[int] = Counter()  # draw → samples decoded so far; both dropped once complete
        self.dry: set[str] = set()

    def start(self) -> int:
        self.drawn += 1
        return self.drawn

    def read(self, draw: int, url: str, size: int) -> None:
        self.sizes[draw] = (url, size)
        self._settle(draw)  # a draw of no samples, or one whose samples were all decoded before its end was read

    def decoded_one(self, draw: int) -> None:
        self.decoded[draw] += 1
        self._settle(draw)

    def _settle(self, draw: int) -> None:
        if draw in self.sizes and self.decoded[draw] == self.sizes[draw][1]:
            self.dry.add(self.sizes.pop(draw)[0])
            self.decoded.pop(draw, None)

    def all_dry(self) -> bool:
        return self.dry >= self.urls


class ShardStream(IterableDataset):
    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        epoch_batches: int | None,
        resampled: bool,
        shuffle: bool,
        shuffle_buffer: int,
        resolution: int,
        resize: str,
        template_lines: list[str],
        name: str,
        shuffle_tags: bool,
        tag_dropout: float,
        use_weight: bool,
        vae_fingerprint: str,
        text_fingerprint: str,
        max_image_pixels: int,
        exclude: frozenset[str] = frozenset(),
    ) -> None:
        self.urls = urls
        self.exclude = exclude  # content keys of held-out images, never trained on
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch_batches = epoch_batches
        self.resampled = resampled
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.target = (resolution, resolution)
        self.resize = resize
        self.lines = template_lines
        self.name = name
        self.shuffle_tags = shuffle_tags
        self.tag_dropout = tag_dropout
        self.varies = bool(shuffle_tags) or tag_dropout != 0
        self.use_weight = use_weight
        self.vae_fp = vae_fingerprint
        self.text_fp = text_fingerprint
        self.max_image_pixels = max_image_pixels
        self.epoch = 0
        self._dry: _DryShards | None = None  # resampled mode, until the first usable sample
        self._held_out_copies = 0  # samples dropped as copies of held-out images (reset per iteration)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.epoch_batches is None:
            raise TypeError("a single-pass webdataset epoch has no known length; set data.epoch_length")
        return self.epoch_batches

    # ---- shard source -------------------------------------------------------------------------------
    def _pass_urls(self, n: int) -> Iterator[dict[str, str]]:
        """Shard URLs of pass n, the same sequence on every rank."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{self.epoch}:{n}").shuffle(urls)
        return iter([{"url": url} for url in urls])

    def _passes(self, wid: int, nw: int) -> Iterator[dict[str, Any]]:
        """Decoded samples of this rank and worker, pass after pass; endless when the epoch length is explicit.

        Each pass is its own pipeline so the sample shuffle buffer never spans two passes: a buffer fed from the
        next pass would repeat samples inside an epoch (and hide the usable-sample count of the first pass).
        """
        n = 0
        while True:
            stages: list[Any] = [
                partial(self._pass_urls, n),
                self._split_node,
                wds.split_by_worker,
                self._shard_samples,
            ]
            if self.shuffle and self.shuffle_buffer > 1:
                seed = hash((self.seed, self.epoch, self.rank, wid, n)) & 0x7FFFFFFF
                stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), seed=seed))
            yield from wds.DataPipeline(*stages, self._decode)
            if self.epoch_batches is None:
                return
            if self._usable == 0:  # this rank and worker read only their share of the shards: say which
                read = len(self.urls[self.rank :: self.world_size][wid::nw])
                raise ValueError(self._nothing_usable((self.rank, wid, read)))
            n += 1

    def _split_node(self, src: Iterator[Any]) -> Iterator[Any]:
        # Explicit node splitter from the trainer's rank: works with spawn workers and without RANK in env.
        return islice(src, self.rank, None, self.world_size)

    def _nothing_usable(self, share: tuple[int, int, int] | None = None) -> str:
        """The error of a stream that yields nothing; `share`: (rank, worker, shards read) when the stream reads
        only part of data.urls, so the message counts the shards that were actually read."""
        where = f"{len(self.urls)} shard(s)"
        if share is not None and share[2] != len(self.urls):
            rank, worker, read = share
            where = f"the {read} of {len(self.urls)} shard(s) that rank {rank}, DataLoader worker {worker} reads"
        copies = self._held_out_copies
        reasons = [] if copies and not self._skips.counts else [self._skips.describe()]
        if copies:  # not a bad sample (so not in the skip log), but the reason this stream may be empty
            reasons.append(f"  held_out_copy: {copies}  (the same bytes as an image data.val_count holds out for "
                           "validation: never trained on)")  # fmt: skip
        return f"data.urls: no usable sample in {where}; reasons with counts:\n" + "\n".join(reasons)

    def _tar_handler(self, exn: Exception) -> bool:
        """Count and continue. webdataset reports a member that cannot be read from the member iterator
        (message tagged " @ <stream>"), then the shard-level failure that ends that shard from the expander
        (args extended with stream and url): counted as corrupt_tar_member and corrupt_shard."""
        args = exn.args
        if len(args) >= 3 and isinstance(args[-1], str):
            self._shard_cut = True
            self._skips.add("corrupt_shard", args[-1], f"{type(exn).__name__}: {args[0]}; rest of shard lost")
        else:
            self._skips.add("corrupt_tar_member", str(args[0]) if args else "shard", type(exn).__name__)
        return True

    def _shard_samples(self, src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """Samples of each shard, grouped one shard at a time; a sample the shard's end cut is skipped and counted.

        webdataset groups members by key across the whole URL stream and marks a shard's end only when the shard
        was read to the end: after a truncated shard, the cut sample would be yielded without its missing members,
        or joined with the next shard's first sample of the same key (a resampled shard whose cut sample is its first
        then fails on "duplicate file name" at every draw and never yields). Running webdataset's own tar reader on
        one shard at a time keeps samples apart.
        """
        for shard in src:
            self._member = ""  # the member being read; when the shard fails, the one it failed in (or after)
            self._shard_cut = False  # set by _tar_handler when the shard ends in an error
            draw = self._dry.start() if self._dry is not None else 0  # resampled: this draw of the shard
            size = 0  # samples of this draw yielded
            last: dict[str, Any] | None = None
            for sample in wds.tarfile_samples(iter([shard]), handler=self._tar_handler, select_files=self._note):
                if last is not None:
                    size += 1
                    yield last
                last = sample
                if self._dry is not None:
                    last["__draw__"] = draw  # which draw _decode counts it to
            # A shard that failed after (or inside) a member of its last sample may have lost that sample's later
            # members; tar cannot tell, so the sample is not trusted. One that failed inside the next sample's first
            # member ended its last sample cleanly.
            if (
                last is not None
                and self._shard_cut
                and wds.tariterators.base_plus_ext(self._member)[0] == last["__key__"]
            ):
                members = sorted(k for k in last if not k.startswith("__"))
                self._skips.add("truncated_sample", f"{shard['url']}:{last['__key__']}", f"read only {members}")
                last = None
            if self._dry is not None:  # the draw's size is known before its last sample can be decoded
                self._dry.read(draw, shard["url"], size + (last is not None))
                self._fail_if_all_dry()
            if last is not None:
                yield last

    def _note(self, name: str) -> bool:
        """select_files hook: webdataset calls it with each member's name before reading the member."""
        self._member = name
        return True

    # ---- samples ------------------------------------------------------------------------------------
    def _decode(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            item = self._decode_one(sample, key)
            if item is not None:
                self._usable += 1
                self._dry = None  # the stream yields: no end test, no bookkeeping for the rest of the epoch
                yield item
            elif self._dry is not None and "__draw__" in sample:
                self._dry.decoded_one(sample["__draw__"])
                self._fail_if_all_dry()

    def _fail_if_all_dry(self) -> None:
        """Resampled mode: every shard had a complete draw with nothing usable, so no draw ever will have one.

        `_dry` exists only until the first usable sample, so it alone says nothing usable has come yet."""
        if self._dry is not None and self._dry.all_dry():
            raise ValueError(self._nothing_usable())

    def _decode_one(self, sample: dict[str, Any], where: str) -> dict[str, Any] | None:
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            self._skips.add("missing_image", where, f"members: {sorted(k for k in sample if k[:2] != '__')}")
            return None
        data = sample[ext]
        caption = read_caption(where, sample.get("txt"), "", self._skips)
        meta = self._json(sample, where)
        sha = sha256_bytes(data)
        if sha in self.exclude:
            self._held_out_copies += 1
            return None
        item: dict[str, Any] = {"sha": sha, "filewords": caption}
        latent = self._precomputed_latent(sample, meta, where)
        header = _header_size(data)
        if header is not None:  # placement is a function of the sizes alone: the model's size conditioning
            item["sizes"] = place(header, self.target, self.resize).sizes()
        if latent is None or self.use_weight:
            try:
                decoded = decode_image(data, self.max_image_pixels)
            except BadImage as e:
                self._skips.add(e.kind, where, e.detail)
                return None
            for kind in decoded.repairs:
                self._skips.add(kind, where)
            p = place(decoded.rgb.size, self.target, self.resize)
            item["sizes"] = p.sizes()
            if latent is None:
                item["pixels"] = to_pixels(decoded.rgb, p)
            if self.use_weight:
                alpha = decoded.alpha
                item["alpha"] = to_pixels(alpha.convert("RGB"), p)[0].add(1).div(2) if alpha is not None else None
        if latent is not None:
            item["mean"], item["std"] = latent
        if self.varies:
            rng = random.Random(f"caption:{self.seed}:{self.epoch}:{sha}")
            item["caption"] = make_prompt(self.lines, caption, self.name, rng, self.shuffle_tags, self.tag_dropout)
        else:
            item["caption"] = make_prompt(self.lines, caption, self.name, fixed_prompt_rng(sha), False, 0.0)
            if "context.npy" in sample and meta.get("text_encoder") == self.text_fp:
                if meta.get("prompt") == item["caption"]:
                    ctx = self._npy(sample["context.npy"], where)
                    if ctx is not None:
                        item["context"] = torch.from_numpy(ctx).float()
                    pooled = self._npy(sample["pooled.npy"], where) if "pooled.npy" in sample else None
                    if pooled is not None:
                        item["pooled"] = torch.from_numpy(pooled).float()
        return item

    def _json(self, sample: dict[str, Any], where: str) -> dict[str, Any]:
        if "json" not in sample:
            return {}
        try:
            meta = json.loads(sample["json"])
            return meta if isinstance(meta, dict) else {}
        except (ValueError, UnicodeDecodeError) as e:
            self._skips.add("corrupt_tar_member", where, f"json: {e}")
            return {}

    def _npy(self, data: bytes, where: str) -> np.ndarray | None:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            self._skips.add("corrupt_tar_member", where, f"npy: {e}")
            return None

    def _precomputed_latent(
        self, sample: dict[str, Any], meta: dict[str, Any], where: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if "latent.npy" not in sample:
            return None
        fresh = (
            meta.get("vae") == self.vae_fp
            and tuple(meta.get("target", ())) == self.target
            and meta.get("resize") == self.resize
        )
        if not fresh:
            self._skips.add("stale_latent", where, "made for another model, size or resize mode; re-encoding")
            return None
        arr = self._npy(sample["latent.npy"], where)
        if arr is None:
            return None
        t = torch.from_numpy(arr).float()
        if t.ndim == 4 and t.shape[0] == 2:
            return t[0], t[1]
        if t.ndim == 3:  # mean only: sampling degenerates to deterministic
            return t, torch.zeros_like(t)
        self._skips.add("corrupt_tar_member", where, f"latent.npy has shape {tuple(t.shape)}")
        return None

    def first_samples(self, url: str, count: int) -> list[dict[str, Any]]:
        """The first `count` usable samples of shard `url` in stored order, decoded as for training (the
        held-out set: every rank reads the same ones)."""
        self._skips = SkipLog(verbose=False)
        self._dry = None  # the held-out set is read once, not drawn
        found: list[dict[str, Any]] = []
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), self._shard_samples):
            item = self._decode_one(sample, f"{url}:{sample.get('__key__', '?')}")
            if item is not None and all(item["sha"] != other["sha"] for other in found):
                found.append(item)
            if len(found) == count:
                break
        return found

    # ---- batches ------------------------------------------------------------------------------------
    def _groups(self, src: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Items in batch_size groups of one kind: precomputed-latent items and pixel items are batched apart."""
        pending: dict[str, list[dict[str, Any]]] = {"latent": [], "pixels": []}
        for item in src:
            kind = "latent" if "mean" in item else "pixels"
            pending[kind].append(item)
            if len(pending[kind]) == self.batch_size:
                yield pending[kind]
                pending[kind] = []
        # The source ends only in a single-pass epoch (resampled and epoch-length streams are endless and cut by
        # with_epoch, so their batch count is unchanged): yield each kind's short last group, or a pass would drop
        # up to batch_size - 1 samples per worker and kind, mostly the same ones every epoch.
        yield from (group for group in pending.values() if group)

    def _batch(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Homogeneous batches, each carrying the skip counts added since the previous one."""
        reported: Counter[str] = Counter()
        for group in self._groups(src):
            batch = self._collate(group)
            batch["_skipped"] = dict(self._skips.counts - reported)
            reported = Counter(self._skips.counts)
            yield batch
        tail = self._skips.counts - reported
        if tail:  # counts after the last batch; the loader merges this and yields nothing for it
            yield {"_skipped": dict(tail)}

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"caption": [i["caption"] for i in items], "sha": [i["sha"] for i in items]}
        if "mean" in items[0]:
            batch["mean"] = torch.stack([i["mean"] for i in items])
            batch["std"] = torch.stack([i["std"] for i in items])
        else:
            batch["pixels"] = torch.stack([i["pixels"] for i in items])
        if all("sizes" in i for i in items):
            batch["sizes"] = torch.tensor([i["sizes"] for i in items], dtype=torch.long)
        if not self.varies and all("context" in i for i in items):
            batch["context"] = torch.stack([i["context"] for i in items])
            if all("pooled" in i for i in items):
                batch["pooled"] = torch.stack([i["pooled"] for i in items])
        if self.use_weight:
            h, w = self.target[1], self.target[0]
            batch["alpha"] = torch.stack(
                [i["alpha"] if i.get("alpha") is not None else torch.ones(h, w) for i in items]
            )
            batch["has_alpha"] = torch.tensor([i.get("alpha") is not None for i in items])
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        self._skips = SkipLog()
        self._usable = 0
        self._held_out_copies = 0
        self._dry = _DryShards(self.urls) if self.resampled else None
        if self.resampled:
            # Endless random shards: each rank and worker draws its own stream, so no node/worker split.
            stages: list[Any] = [
                wds.ResampledShards(
                    self.urls, seed=self.seed + self.epoch, worker_seed=_WorkerSeed(self.rank), deterministic=True
                ),
                self._shard_samples,
            ]
            if self.shuffle and self.shuffle_buffer > 1:
                seed = hash((self.seed, self.epoch, self.rank, wid)) & 0x7FFFFFFF
                stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), seed=seed))
            stages.append(self._decode)
        else:
            stages = [partial(self._passes, wid, nw)]  # node/worker split, tar, per-pass shuffle and decode
        pipeline = wds.DataPipeline(*stages, self._batch)
        if self.epoch_batches is not None:
            # Exact per-rank total: worker w yields its share of epoch_batches (the DataLoader interleaves).
            share = self.epoch_batches // nw + (1 if wid < self.epoch_batches % nw else 0)
            pipeline = pipeline.with_epoch(share)
        produced = 0
        for batch in pipeline:
            produced += "sha" in batch
            yield batch
        if produced == 0 and self._usable == 0 and self.epoch_batches is None and nw == 1:
            raise ValueError(self._nothing_usable())


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(w, h) from the image header without decoding pixels; None if unreadable (the full decode reports it)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - classified by decode_image when it matters
        return None


def batches_per_rank(epoch_length: int, batch_size: int, world_size: int) -> int:
    """Samples per epoch (global) → batches every rank takes (ceil, so no sample budget is lost)."""
    return max(1, math.ceil(epoch_length / (batch_size * world_size)))
