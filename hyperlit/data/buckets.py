"""Aspect-ratio buckets (kohya's semantics) and the per-epoch batch plan shared by all ranks.

Bucket resolutions: the square that fits `max_area`, plus for every width from `min_size` to `max_size` in
`step` increments the tallest height (multiple of `step`, at most `max_size`) whose area fits `max_area`,
and the transposed pair. An image goes to the bucket whose aspect ratio is nearest its own.
"""

from __future__ import annotations

import math
import random


def bucket_resolutions(max_area: int, step: int, min_size: int, max_size: int) -> list[tuple[int, int]]:
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def plan_batches(
    groups: dict[tuple[int, int], list[int]],
    batch_size: int,
    *,
    drop_last: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """This rank's batches for one epoch; every batch holds indices of one group.

    All ranks compute the same global plan from (seed, epoch) and take every world_size-th batch. When the
    batch count does not divide evenly, short ranks repeat batches from the start of their share so every
    rank takes the same number of steps (a DDP hang otherwise).
    """
    rng = random.Random(f"plan:{seed}:{epoch}")
    batches: list[list[int]] = []
    for key in sorted(groups):
        idx = list(groups[key])
        if shuffle:
            rng.shuffle(idx)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            if len(chunk) < batch_size and drop_last:
                break
            batches.append(chunk)
    if shuffle:
        rng.shuffle(batches)
    if world_size == 1:
        return batches
    per_rank = math.ceil(len(batches) / world_size)
    mine = batches[rank::world_size]
    if not mine:
        mine = batches[:1]
    return mine + mine[: per_rank - len(mine)]  # at most one batch short (per_rank is a ceil)
