"""The training stream: finished records → single-bucket batches, split by rank and by DataLoader worker.

An IterableDataset (not a sampler) so Lightning leaves the distribution to us: every rank computes the same
plan from (seed, epoch) and takes its share, with the same number of batches on every rank.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hyperlit.data.buckets import plan_batches
from hyperlit.data.captions import make_prompt
from hyperlit.data.images import weight_from_alpha
from hyperlit.data.skips import SkipLog

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """What one training example needs, in the model's scaled latent space."""

    latent: torch.Tensor  # scaled mean (deterministic), scaled sample (once), scaled mean (random)
    latent_std: torch.Tensor | None  # scaled posterior std, only for latent_sampling=random
    caption: str
    prompt: str | None
    context_index: int | None
    alpha: torch.Tensor | None
    sha: str
    target: tuple[int, int]
    sizes: tuple[int, ...] = ()  # Placement.sizes(): original h, w, crop top, left, target h, w


def this_workers_share(batches: list[list[int]]) -> Iterator[list[int]]:
    """The batches this DataLoader worker yields: round-robin, which matches the DataLoader's worker order, so the
    batch order of the plan is kept (all of them outside a worker)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return (batch for b, batch in enumerate(batches) if b % workers == worker)


class BatchStream(IterableDataset):
    def __init__(
        self,
        samples: list[Sample],
        contexts: torch.Tensor | None,
        *,
        batch_size: int,
        pooled: torch.Tensor | None = None,
        buckets: bool,
        shuffle: bool,
        seed: int,
        template_lines: list[str],
        name: str,
        shuffle_tags: bool,
        tag_dropout: float,
        use_weight: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.samples = samples
        self.contexts = contexts
        self.pooled = pooled
        self.batch_size = min(batch_size, len(samples))  # A1111: batch = min(batch, N)
        self.buckets = buckets
        self.shuffle = shuffle
        self.seed = seed
        self.lines = template_lines
        self.name = name
        self.shuffle_tags = shuffle_tags
        self.tag_dropout = tag_dropout
        self.use_weight = use_weight
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(samples):
            self.groups.setdefault(s.target if buckets else (0, 0), []).append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        # Bucketed epochs keep partial batches (each image once per epoch, kohya); plain epochs drop the
        # remainder like A1111 (steps per epoch = N // batch).
        return plan_batches(
            self.groups,
            self.batch_size,
            drop_last=not self.buckets,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __len__(self) -> int:
        return len(self.plan(0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in this_workers_share(self.plan()):
            yield self.collate(batch)

    def collate(self, indices: list[int]) -> dict[str, Any]:
        latents, captions, weights = [], [], []
        varies = self.shuffle_tags or self.tag_dropout != 0
        for i in indices:
            s = self.samples[i]
            lat = s.latent
            if s.latent_std is not None:
                g = torch.Generator().manual_seed(_seed_int(f"noise:{self.seed}:{self.epoch}:{i}"))
                lat = lat + s.latent_std * torch.randn(lat.shape, generator=g)
            latents.append(lat)
            if varies:
                rng = random.Random(f"caption:{self.seed}:{self.epoch}:{i}")
                captions.append(make_prompt(self.lines, s.caption, self.name, rng, self.shuffle_tags, self.tag_dropout))
            else:
                captions.append(s.prompt)
            if self.use_weight:
                weights.append(weight_from_alpha(s.alpha, lat.shape[0], (lat.shape[1], lat.shape[2])))
        batch: dict[str, Any] = {"latents": torch.stack(latents).float(), "caption": captions}
        if all(self.samples[i].sizes for i in indices):
            batch["sizes"] = torch.tensor([self.samples[i].sizes for i in indices], dtype=torch.long)
        if not varies and self.contexts is not None:
            rows = [self.samples[i].context_index for i in indices]
            batch["context"] = self.contexts[rows]
            if self.pooled is not None:
                batch["pooled"] = self.pooled[rows]
        if self.use_weight:
            batch["weight"] = torch.stack(weights)
        return batch


def _seed_int(text: str) -> int:
    return random.Random(text).getrandbits(63)


class EpochLoader(DataLoader):
    """DataLoader that tells its dataset the trainer's epoch and logs the bad-input summary after each epoch.

    Worker-side skip counts travel inside batches under `_skipped` and are merged here, in the main process.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        epoch_fn: Callable[[], int],
        skips: SkipLog,
        progress_fn: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        # A generator of its own: otherwise every new iterator draws its base seed from the global torch RNG, which
        # the training noise also comes from, and a resumed run would draw different noise than an uninterrupted one.
        kwargs.setdefault("generator", torch.Generator().manual_seed(getattr(dataset, "seed", 0) or 0))
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn
        self._skips = skips
        # Batches of the current epoch the trainer has taken; saved in checkpoints (Lightning's `_Stateful`
        # protocol) so that a run resumed mid-epoch continues with the next batch of the same epoch plan.
        self._progress_fn = progress_fn
        self._resume_at: tuple[int, int] | None = None
        self._reported: Counter[str] | None = None  # the counts the last epoch report showed

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch_fn(), "batches": self._progress_fn() if self._progress_fn else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = self._epoch_fn()
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        try:
            expected = len(self.dataset)
        except TypeError:
            expected = None
        skip = self._resume_at[1] if self._resume_at and self._resume_at[0] == epoch else 0
        self._resume_at = None
        count = 0
        for batch in super().__iter__():
            if isinstance(batch, dict) and "_skipped" in batch:
                self._skips.merge(batch.pop("_skipped"))
                if not batch:  # a counts-only message from a worker
                    continue
            if skip:
                skip -= 1  # taken before the checkpoint this run resumed from
                expected = expected - 1 if expected is not None else None
                continue
            count += 1
            if count == expected:
                # Lightning may stop pulling once it has `len` batches, so report before the last one.
                self._report(epoch)
            yield batch
        if count != expected:
            self._report(epoch)

    def _report(self, epoch: int) -> None:
        """The first epoch's counts, then only epochs that met new bad input: a small set (the demo has 3 batches
        an epoch) would otherwise print the same "no bad input" line hundreds of times."""
        news = self._reported is None or self._skips.counts != self._reported
        self._reported = Counter(self._skips.counts)
        level = logging.INFO if news else logging.DEBUG
        log.log(level, "data: epoch %d done; bad input so far: %s", epoch, self._skips.summary())


class TrainerEpochs:
    """Mixin for the data modules that feed an :class:`EpochLoader`: it follows the trainer's epoch and progress,
    and counts passes itself when there is no trainer (tests, benchmarks)."""

    def epoch_loader(self, stream: Any, skips: SkipLog, num_workers: int) -> EpochLoader:
        return EpochLoader(
            stream,
            epoch_fn=self._current_epoch,
            progress_fn=self._batches_done,
            skips=skips,
            num_workers=num_workers,
            pin_memory=self._on_cuda(),
        )

    def _on_cuda(self) -> bool:
        # Pinned batches let Lightning's non_blocking copy to the GPU overlap the step; on CPU pinning only costs.
        device = getattr(getattr(getattr(self, "trainer", None), "strategy", None), "root_device", None)
        return device is not None and device.type == "cuda"

    def _batches_done(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.current_epoch
        self._own_epoch = getattr(self, "_own_epoch", -1) + 1
        return self._own_epoch
