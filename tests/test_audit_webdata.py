"""Audit (issue 14): skip counts from webdataset workers are exact when the bad samples come before several
batches of a worker (the per-batch delta path), not only after its last batch (the tail path)."""

from __future__ import annotations

from helpers.fakes import FakeEncoder
from helpers.images import make_folder, png_bytes
from helpers.tars import write_tar

from hyperlit.data import WebDataModule, make_shards


def test_skips_before_several_batches_are_counted_once(tmp_path):
    make_shards(make_folder(tmp_path / "d", n=8), tmp_path / "s", samples_per_shard=2)
    bad = tmp_path / "s" / "bad.tar"
    write_tar(bad, [("e.png", b""), ("e.txt", b"x"), ("f.png", png_bytes()), ("f.txt", b"\xff\xfe bad")])
    # the bad shard first: worker 0 reads bad, shard 1, shard 3 (1 + 2 + 2 usable: two batches of 2 after the
    # skips and a last one of 1), worker 1 reads shards 0 and 2 (4 usable: two batches)
    urls = [str(bad)] + [str(tmp_path / "s" / f"shard-00000{i}.tar") for i in range(4)]
    dm = WebDataModule(
        urls=urls, encoder=FakeEncoder(), resolution=64, batch_size=2, num_workers=2, shuffle=False, shuffle_buffer=0
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["caption"]) for b in batches) == 9
    assert dict(dm.skipped) == {"zero_byte": 1, "caption_not_utf8": 1}
    # the counts are "bad input so far": a second pass over the same shards adds the same counts once more
    list(dm.train_dataloader())
    assert dict(dm.skipped) == {"zero_byte": 2, "caption_not_utf8": 2}
