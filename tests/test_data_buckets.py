"""Aspect-ratio buckets: kohya's resolution set, one resolution per batch, each image once per epoch."""

from __future__ import annotations

from collections import Counter

from helpers.fakes import FakeEncoder
from helpers.images import write_image

from hyperlit.data import FolderDataModule
from hyperlit.data.buckets import bucket_resolutions, nearest_bucket, plan_batches


def test_bucket_resolutions_sd15_defaults():
    resos = bucket_resolutions(512 * 512, 64, 256, 1024)
    assert (512, 512) in resos and (256, 1024) in resos and (1024, 256) in resos
    assert (448, 576) in resos and (576, 448) in resos and (384, 640) in resos
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert all(256 <= w <= 1024 and 256 <= h <= 1024 for w, h in resos)
    assert all((h, w) in resos for w, h in resos)  # symmetric
    # Widths 256..1024 step 64 give 13 pairs; heights: floor(262144 / w / 64) * 64 capped at 1024.
    expected = set()
    for w in range(256, 1025, 64):
        h = min(1024, (262144 // w) // 64 * 64)
        if h >= 256:
            expected |= {(w, h), (h, w)}
    assert set(resos) == expected | {(512, 512)}


def test_nearest_bucket_by_aspect_ratio():
    resos = bucket_resolutions(64 * 64, 8, 32, 128)
    assert nearest_bucket((300, 300), resos) == (64, 64)
    assert nearest_bucket((1500, 1000), resos) == (80, 48)  # 1.667 beats 72x56 (1.286) for a 1.5 image
    errors = sorted((abs(w / h - 0.5), (w, h)) for w, h in resos)
    assert nearest_bucket((1000, 2000), resos) == errors[0][1] == (40, 88)


def test_plan_one_group_per_batch_each_index_once():
    groups = {(64, 64): list(range(7)), (72, 56): list(range(7, 10)), (56, 72): [10]}
    plan = plan_batches(groups, 3, drop_last=False, shuffle=True, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(11))
    owner = {i: k for k, v in groups.items() for i in v}
    assert all(len({owner[i] for i in b}) == 1 for b in plan)
    assert plan != plan_batches(groups, 3, drop_last=False, shuffle=True, seed=1, epoch=1)  # reshuffled per epoch
    assert plan == plan_batches(groups, 3, drop_last=False, shuffle=True, seed=1, epoch=0)


def test_plan_equal_steps_on_every_rank():
    groups = {(64, 64): list(range(7)), (72, 56): list(range(7, 10))}
    plans = [
        plan_batches(groups, 2, drop_last=False, shuffle=True, seed=5, epoch=2, rank=r, world_size=3) for r in range(3)
    ]
    assert len({len(p) for p in plans}) == 1
    covered = {i for p in plans for b in p for i in b}
    assert covered == set(range(10))


def test_datamodule_buckets(tmp_path):
    sizes = [(64, 64)] * 4 + [(96, 64)] * 3 + [(64, 128)] * 2 + [(80, 64)]
    for i, size in enumerate(sizes):
        write_image(tmp_path, f"img{i}", f"tag{i}", size=size, colour=(10 * i, 50, 200 - 10 * i))
    enc = FakeEncoder()
    dm = FolderDataModule(
        path=str(tmp_path),
        encoder=enc,
        resolution=64,
        batch_size=2,
        buckets=True,
        bucket_step=8,
        cache_dir=str(tmp_path / "cache"),
        seed=3,
    )
    dm.prepare_data()
    dm.setup("fit")
    targets = Counter(s.target for s in dm.stream.samples)
    assert len(targets) >= 3 and all(w * h <= 64 * 64 for w, h in targets)
    for _epoch in range(2):
        seen = []
        for b in dm.train_dataloader():
            assert len({tuple(x.shape) for x in b["latents"]}) == 1  # one resolution per batch
            seen += b["caption"]
        assert sorted(seen) == sorted(s.prompt for s in dm.stream.samples)  # each image exactly once
        assert len(seen) == 10
    # Crop offsets are recorded: the 96x64 images were scaled to cover a wider bucket and centre-cropped.
    rec = next(r for r in dm.last_encoded.records if r.where.endswith("img4.png"))
    assert rec.placement.target[0] > rec.placement.target[1]
    assert rec.placement.crop == (
        (rec.placement.resized[0] - rec.placement.target[0]) // 2,
        (rec.placement.resized[1] - rec.placement.target[1]) // 2,
    )
    again = FakeEncoder()
    dm2 = FolderDataModule(
        path=str(tmp_path),
        encoder=again,
        resolution=64,
        batch_size=2,
        buckets=True,
        bucket_step=8,
        cache_dir=str(tmp_path / "cache"),
        seed=3,
    )
    dm2.prepare_data()
    dm2.setup("fit")
    assert again.image_calls == 0  # bucketed entries are cached under their bucket key
    rec2 = next(r for r in dm2.last_encoded.records if r.where.endswith("img4.png"))
    assert rec2.placement == rec.placement
