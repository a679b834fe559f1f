"""Audit (issue 14, mutmut survivors of hyperlit.data.buckets): bucket sizes, the nearest bucket and the per-rank
batch plan, against lists worked out by hand."""

from __future__ import annotations

from hyperlit.data.buckets import bucket_resolutions, nearest_bucket, plan_batches


def test_bucket_resolutions_by_hand() -> None:
    # area 1600, step 8, widths 20..60 by 8 (20 is not a multiple of 8, so width 60 adds pairs no other width does):
    # 20 -> 1600//20 = 80 -> 80, capped at 60; 28 -> 57 -> 56; 36 -> 44 -> 40; 44 -> 36 -> 32; 52 -> 30 -> 24;
    # 60 -> 26 -> 24; plus the square of side 40 and every transposed pair
    expected = {(40, 40), (20, 60), (28, 56), (36, 40), (44, 32), (52, 24), (60, 24)}
    expected |= {(h, w) for w, h in expected}
    assert bucket_resolutions(1600, 8, 20, 60) == sorted(expected)


def test_nearest_bucket_prefers_the_ratio_then_the_larger_area() -> None:
    assert nearest_bucket((3, 2), [(24, 16), (48, 32)]) == (48, 32)  # same ratio 1.5: the larger
    assert nearest_bucket((1, 1), [(10, 20), (30, 20)]) == (30, 20)  # ratio 0.5 and 1.5 are as far from 1
    assert nearest_bucket((64, 30), [(32, 32), (40, 24), (48, 16)]) == (40, 24)  # 2.13: 1.67 is nearest


GROUPS = {(1, 1): [5, 6, 7], (0, 0): [0, 1, 2, 3, 4]}  # planned in sorted key order: (0, 0) first


def test_plan_without_shuffle_by_hand() -> None:
    plan = dict(shuffle=False, seed=0, epoch=0)
    # all batches: [0 1] [2 3] [4] [5 6] [7]; with drop_last: [0 1] [2 3] [5 6]
    assert plan_batches(GROUPS, 2, drop_last=False, **plan) == [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert plan_batches(GROUPS, 2, drop_last=True, **plan) == [[0, 1], [2, 3], [5, 6]]
    # two ranks take every second batch; the short one repeats its first batch (equal step counts)
    assert plan_batches(GROUPS, 2, drop_last=False, world_size=2, **plan) == [[0, 1], [4], [7]]  # rank 0 default
    assert plan_batches(GROUPS, 2, drop_last=False, rank=1, world_size=2, **plan) == [[2, 3], [5, 6], [2, 3]]
    assert plan_batches(GROUPS, 2, drop_last=True, rank=1, world_size=2, **plan) == [[2, 3], [2, 3]]
    # four ranks, three batches: the last rank has none of its own and takes the first batch
    assert plan_batches(GROUPS, 2, drop_last=True, rank=3, world_size=4, **plan) == [[0, 1]]
    assert plan_batches(GROUPS, 2, drop_last=True, rank=2, world_size=4, **plan) == [[5, 6]]
