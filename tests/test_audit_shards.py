"""Audit (issue 14, mutmut survivors of hyperlit.data.webdata): the stream's parts called directly -- worker seeds,
the tar error handler, shard order per pass, the per-pass sample shuffle, corrupt .npy members, the held-out
first samples and the batches per rank -- with values worked out by hand."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.images import png_bytes, rgba_half_png
from helpers.tars import write_tar

from hyperlit.data import webdata
from hyperlit.data.skips import SkipLog
from hyperlit.data.webdata import ShardStream, _WorkerSeed, batches_per_rank


def stream(urls: list[str], **kw) -> ShardStream:
    options = dict(
        batch_size=2, seed=5, rank=0, world_size=1, epoch_batches=None, resampled=False, shuffle=True,
        shuffle_buffer=0, resolution=64, resize="crop", template_lines=["[filewords]"], name="hn", shuffle_tags=False,
        tag_dropout=0.0, use_weight=False, vae_fingerprint="v", text_fingerprint="t", max_image_pixels=10**8,
    )  # fmt: skip
    options.update(kw)
    s = ShardStream(urls, **options)
    s._skips = SkipLog(verbose=False)
    s._usable = 0
    return s


def test_worker_seed_is_rank_times_1000_plus_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _WorkerSeed(3)() == 3000  # main process: worker 0
    monkeypatch.setattr(webdata, "get_worker_info", lambda: SimpleNamespace(id=2))
    assert _WorkerSeed(3)() == 3002


def test_tar_errors_are_counted_as_shard_or_member() -> None:
    s = stream([])
    assert s._tar_handler(ValueError("bad header", "<stream>", "shard-0.tar")) is True
    assert s._tar_handler(OSError("member 7.png @ <stream>")) is True
    assert s._tar_handler(OSError()) is True
    assert dict(s._skips.counts) == {"corrupt_shard": 1, "corrupt_tar_member": 2}
    assert s._skips.examples == {
        "corrupt_shard": ["shard-0.tar: ValueError: bad header; rest of shard lost"],
        "corrupt_tar_member": ["member 7.png @ <stream>: OSError", "shard: OSError"],
    }


def test_shard_order_is_shuffled_per_pass_identically_on_every_rank() -> None:
    urls = [f"s{i}.tar" for i in range(12)]
    orders = {}
    for rank in (0, 1):
        for n in (0, 1):
            orders[rank, n] = [d["url"] for d in stream(urls, rank=rank, world_size=2)._pass_urls(n)]
    assert orders[0, 0] == orders[1, 0] and orders[0, 1] == orders[1, 1]  # the same on every rank
    assert orders[0, 0] != orders[0, 1] and sorted(orders[0, 0]) == sorted(urls)  # another order each pass
    assert [d["url"] for d in stream(urls, shuffle=False)._pass_urls(3)] == urls


def test_passes_count_up_and_each_pass_gets_its_own_shuffle_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    shuffles: list[tuple] = []

    def shuffle(bufsize=None, initial=None, seed=None):  # noqa: ANN001 - stands in for wds.shuffle
        shuffles.append((bufsize, initial, seed))
        return lambda src: src

    monkeypatch.setattr(webdata.wds, "shuffle", shuffle)
    # a single pass (no epoch length) over no shards: pass 0 only, nothing yielded
    single = stream([], shuffle_buffer=200)
    seen: list = []
    real_pass_urls = single._pass_urls
    single._pass_urls = lambda n: (seen.append(n), real_pass_urls(n))[1]
    assert list(single._passes(wid=0, nw=1)) == [] and seen == [0]
    assert len(shuffles) == 1 and shuffles[0][:2] == (200, 100)
    # with an epoch length the passes go on (0, 1, 2, ...) until one finds nothing usable
    endless = stream([], shuffle_buffer=2, epoch_batches=4)
    endless._usable = 1
    passes: list = []

    def pass_urls(n):  # noqa: ANN001
        passes.append(n)
        if n == 2:
            endless._usable = 0  # the third pass finds nothing: the stream stops with the reasons
        return iter([])

    endless._pass_urls = pass_urls
    shuffles.clear()
    with pytest.raises(ValueError) as info:
        list(endless._passes(wid=1, nw=2))
    assert passes == [0, 1, 2]
    assert str(info.value) == "data.urls: no usable sample in 0 shard(s); reasons with counts:\n  (no files were found)"
    seeds = [seed for _, _, seed in shuffles]
    assert [s[:2] for s in shuffles] == [(2, 2)] * 3
    assert all(isinstance(seed, int) and 0 <= seed < 2**31 for seed in seeds) and len(set(seeds)) == 3
    # no sample shuffle without shuffle, or with a buffer of one sample
    shuffles.clear()
    list(stream([], shuffle=False, shuffle_buffer=200)._passes(wid=0, nw=1))
    list(stream([], shuffle_buffer=1)._passes(wid=0, nw=1))
    assert shuffles == []


def test_a_corrupt_npy_member_is_counted_and_pickles_are_refused() -> None:
    import numpy as np

    s = stream([])
    assert s._npy(b"garbage", "a.tar:0") is None
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    assert s._npy(buffer.getvalue(), "a.tar:1") is None  # an object array would need pickle: refused
    assert dict(s._skips.counts) == {"corrupt_tar_member": 2}
    assert all(e.startswith(("a.tar:0: npy: ", "a.tar:1: npy: ")) for e in s._skips.examples["corrupt_tar_member"])


def test_first_samples_are_the_first_distinct_usable_ones_in_stored_order(tmp_path: Path) -> None:
    a, b, c = png_bytes(colour=(10, 0, 0)), png_bytes(colour=(20, 0, 0)), png_bytes(colour=(30, 0, 0))
    url = write_tar(tmp_path / "held.tar", [
        ("0.png", a), ("0.txt", b"first"), ("1.txt", b"no image"), ("2.png", a), ("2.txt", b"same image"),
        ("3.png", b), ("3.txt", b"second"), ("4.png", c), ("4.txt", b"third"),
    ])  # fmt: skip
    s = stream([url])
    found = s.first_samples(url, 2)
    assert [item["filewords"] for item in found] == ["first", "second"]
    assert dict(s._skips.counts) == {"missing_image": 1}
    assert s._skips.examples["missing_image"] == [f"{url}:1: members: ['txt']"]
    assert not s._skips.verbose
    assert [item["filewords"] for item in stream([url]).first_samples(url, 5)] == ["first", "second", "third"]


@pytest.mark.parametrize(("length", "batch", "world", "expected"), [(100, 4, 2, 13), (96, 4, 2, 12), (3, 4, 2, 1)])
def test_batches_per_rank_by_hand(length, batch, world, expected) -> None:
    assert batches_per_rank(length, batch, world) == expected


def test_random_module_is_not_used_for_the_order() -> None:
    # the shard order depends on (seed, epoch, pass) only, not on the process-wide random state
    urls = [f"s{i}.tar" for i in range(8)]
    random.seed(1)
    first = [d["url"] for d in stream(urls)._pass_urls(0)]
    random.seed(2)
    assert [d["url"] for d in stream(urls)._pass_urls(0)] == first


# --- samples decoded one by one -----------------------------------------------------------------------------


def npy(array) -> bytes:  # noqa: ANN001
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32))
    return buffer.getvalue()


def test_decode_names_each_sample_by_shard_and_key_and_counts_usable_ones() -> None:
    s = stream([], resize="stretch")
    samples = [
        {"__url__": "u.tar", "__key__": "k0", "png": png_bytes(), "txt": b"ok"},
        {"__url__": "u.tar", "__key__": "k1", "txt": b"no image", "json": b"{}"},
        {"__key__": "k2", "png": b""},
        {"__url__": "u.tar", "__key__": "k3", "png": png_bytes(mode="L", colour=90)},
        {"__url__": "u.tar", "txt": b"no key, no image"},
    ]
    items = list(s._decode(iter(samples)))
    assert [i["filewords"] for i in items] == ["ok", ""] and s._usable == 2
    assert s._skips.examples == {
        "missing_image": ["u.tar:k1: members: ['json', 'txt']", "u.tar:?: members: ['txt']"],
        "zero_byte": ["?:k2: file is empty"],
        "converted_grayscale": ["u.tar:k3"],
        "caption_empty": [
            f"{w}: file name has no caption after removing leading numbers" for w in ("?:k2", "u.tar:k3")
        ],
    }
    assert str(pytest.raises(TypeError, len, s).value) == (
        "a single-pass webdataset epoch has no known length; set data.epoch_length"
    )


@pytest.mark.parametrize(
    ("resize", "sizes"), [("stretch", (64, 128, 0, 0, 64, 64)), ("crop", (64, 128, 0, 32, 64, 64))]
)
def test_sizes_follow_the_resize_mode(resize, sizes) -> None:
    # 128x64 onto 64x64: stretch keeps everything; crop scales by 1 and cuts 32 px from the left
    item = stream([], resize=resize)._decode_one({"png": png_bytes(size=(128, 64)), "txt": b"x"}, "w")
    assert item["sizes"] == sizes and item["pixels"].shape == (3, 64, 64)


def test_alpha_weights_with_use_weight() -> None:
    s = stream([], use_weight=True)
    item = s._decode_one({"png": rgba_half_png(), "txt": b"x"}, "w")
    alpha = item["alpha"]
    assert alpha.shape == (64, 64) and float(alpha[:, :30].min()) == 1.0 and float(alpha[:, 34:].max()) == 0.0
    assert s._decode_one({"png": png_bytes(), "txt": b"x"}, "w")["alpha"] is None


def test_prompts_fixed_or_per_epoch() -> None:
    tags = b"a, b, c, d, e, f, g, h"
    fixed = stream([], template_lines=["[name]: [filewords]"])
    assert fixed._decode_one({"png": png_bytes(), "txt": tags}, "w")["caption"] == "hn: a, b, c, d, e, f, g, h"
    varying = stream([], template_lines=["[name]: [filewords]"], shuffle_tags=True, tag_dropout=0.1)
    captions = []
    for epoch in range(4):
        varying.set_epoch(epoch)
        first = varying._decode_one({"png": png_bytes(), "txt": tags}, "w")["caption"]
        assert varying._decode_one({"png": png_bytes(), "txt": tags}, "w")["caption"] == first  # per (epoch, image)
        assert first.startswith("hn: ") and {t.strip() for t in first[4:].split(",")} <= set("abcdefgh")
        captions.append(first)
    assert len(set(captions)) > 1


def test_precomputed_text_context_is_used_only_for_its_prompt_and_encoder() -> None:
    import json

    import numpy as np

    s = stream([])
    base = {"png": png_bytes(), "txt": b"x"}
    meta = {"text_encoder": "t", "prompt": "x"}
    item = s._decode_one({**base, "json": json.dumps(meta).encode(), "context.npy": npy(np.ones((77, 8))),
                          "pooled.npy": npy(np.full(4, 2.0))}, "w")  # fmt: skip
    assert item["context"].shape == (77, 8) and float(item["pooled"][0]) == 2.0
    no_pooled = s._decode_one({**base, "json": json.dumps(meta).encode(), "context.npy": npy(np.ones((77, 8)))}, "w")
    assert "context" in no_pooled and "pooled" not in no_pooled
    assert "context" not in s._decode_one({**base, "json": json.dumps(meta).encode()}, "w")  # no context member
    other = {**meta, "prompt": "another"}
    assert "context" not in s._decode_one({**base, "json": json.dumps(other).encode(), "context.npy": npy([1])}, "w")


def test_json_members_that_are_not_objects_or_not_json() -> None:
    s = stream([])
    listed = {"png": png_bytes(), "txt": b"x", "json": b"[1, 2]", "context.npy": npy([1.0])}
    assert "context" not in s._decode_one(listed, "w")  # a JSON list is no metadata
    assert "pixels" in s._decode_one({"png": png_bytes(), "txt": b"x", "json": b"{broken"}, "u:k")
    assert dict(s._skips.counts) == {"corrupt_tar_member": 1}
    assert s._skips.examples["corrupt_tar_member"][0].startswith("u:k: json: ")


def test_precomputed_latents_fresh_stale_and_misshapen() -> None:
    import json

    import numpy as np

    s = stream([])
    fresh = json.dumps({"vae": "v", "target": [64, 64], "resize": "crop"}).encode()
    both = s._decode_one({"png": png_bytes(), "txt": b"x", "json": fresh, "latent.npy": npy(np.ones((2, 4, 8, 8)))},
                         "w")  # fmt: skip
    assert both["mean"].shape == (4, 8, 8) and "pixels" not in both
    mean_only = s._decode_one({"png": png_bytes(), "txt": b"x", "json": fresh, "latent.npy": npy(np.ones((4, 8, 8)))},
                              "w")  # fmt: skip
    assert float(mean_only["std"].abs().sum()) == 0.0
    no_target = json.dumps({"vae": "v", "resize": "crop"}).encode()
    stale = s._decode_one({"png": png_bytes(), "txt": b"x", "json": no_target, "latent.npy": npy(np.ones((4, 8, 8)))},
                          "u:s")  # fmt: skip
    assert "mean" not in stale and "pixels" in stale
    odd = s._decode_one({"png": png_bytes(), "txt": b"x", "json": fresh, "latent.npy": npy(np.ones((3, 4)))}, "u:o")
    assert "mean" not in odd and "pixels" in odd
    assert s._skips.examples == {
        "stale_latent": ["u:s: made for another model, size or resize mode; re-encoding"],
        "corrupt_tar_member": ["u:o: latent.npy has shape (3, 4)"],
    }


# --- batches ------------------------------------------------------------------------------------------------


def pixel_item(sha: str, alpha=None) -> dict:  # noqa: ANN001
    import torch

    return {"sha": sha, "caption": f"c{sha}", "pixels": torch.zeros(3, 4, 4), "sizes": (4, 4, 0, 0, 4, 4),
            "alpha": alpha, "context": torch.ones(2, 3), "pooled": torch.full((5,), 2.0)}  # fmt: skip


def test_collate_stacks_what_every_item_has() -> None:
    import torch

    s = stream([], resolution=4, use_weight=True)
    s.target = (4, 2)  # w 4, h 2: the missing-alpha default must be h x w
    items = [pixel_item("a", alpha=torch.full((2, 4), 0.5)), pixel_item("b")]
    batch = s._collate(items)
    assert batch["sizes"].dtype == torch.long and batch["sizes"].tolist() == [[4, 4, 0, 0, 4, 4]] * 2
    assert batch["context"].shape == (2, 2, 3) and torch.equal(batch["pooled"], torch.full((2, 5), 2.0))
    assert torch.equal(batch["alpha"], torch.stack([torch.full((2, 4), 0.5), torch.ones(2, 4)]))
    assert batch["has_alpha"].tolist() == [True, False]
    no_pooled = {k: v for k, v in pixel_item("b").items() if k != "pooled"}
    assert "pooled" not in s._collate([pixel_item("a"), no_pooled])  # only when every item has one


def test_latent_and_pixel_items_are_batched_apart_and_late_counts_follow() -> None:
    import torch

    s = stream([], batch_size=2)
    latent = {"sha": "l", "caption": "c", "mean": torch.zeros(4, 2, 2), "std": torch.ones(4, 2, 2)}

    def source():
        yield pixel_item("p1")
        yield {**latent, "sha": "l1"}
        yield pixel_item("p2")
        s._skips.add("truncated", "x")
        yield {**latent, "sha": "l2"}
        s._skips.add("zero_byte", "y")

    batches = list(s._batch(source()))
    assert [b.get("sha") for b in batches] == [["p1", "p2"], ["l1", "l2"], None]
    assert "pixels" in batches[0] and "mean" in batches[1]
    assert [b["_skipped"] for b in batches] == [{}, {"truncated": 1}, {"zero_byte": 1}]


def test_resampled_workers_take_their_share_and_shuffle_per_epoch(tmp_path: Path, monkeypatch) -> None:
    url = write_tar(tmp_path / "r.tar", [(f"{i}.png", png_bytes(colour=(i, 0, 0))) for i in range(4)]
                    + [(f"{i}.txt", b"x") for i in range(4)])  # fmt: skip
    shuffles: list = []

    def shuffle(bufsize=None, initial=None, seed=None):  # noqa: ANN001
        shuffles.append((bufsize, initial, seed))
        return lambda src: src

    monkeypatch.setattr(webdata.wds, "shuffle", shuffle)
    counts = {}
    for wid in (0, 1):
        monkeypatch.setattr(webdata, "get_worker_info", lambda wid=wid: SimpleNamespace(id=wid, num_workers=2))
        s = stream([url], resampled=True, epoch_batches=3, batch_size=1, shuffle_buffer=150)
        counts[wid] = sum("sha" in b for b in s)  # 3 batches over 2 workers: 2 and 1
    assert counts == {0: 2, 1: 1}
    assert [x[:2] for x in shuffles] == [(150, 100)] * 2
    seeds = {x[2] for x in shuffles}
    assert len(seeds) == 2 and all(isinstance(x, int) and 0 <= x < 2**31 for x in seeds)


def test_more_sample_edges() -> None:
    import json

    import numpy as np

    s = stream([], resize="stretch", max_image_pixels=64 * 64)
    meta = json.dumps({"vae": "v", "target": [64, 64], "resize": "stretch", "text_encoder": "t", "prompt": "x"})
    wide = png_bytes(size=(128, 64))  # 8192 px: above this stream's limit, fine for its header
    latent = s._decode_one({"png": wide, "txt": b"x", "json": meta.encode(), "latent.npy": npy(np.ones((2, 8, 8)))},
                           "u:l")  # fmt: skip
    # no decode with a precomputed latent: sizes from the header, as stretch places it; a 3-D latent is the mean
    assert latent["sizes"] == (64, 128, 0, 0, 64, 64) and latent["mean"].shape == (2, 8, 8)
    assert float(latent["std"].abs().sum()) == 0.0
    assert s._decode_one({"png": wide, "txt": b"x"}, "u:big") is None  # decoding it hits the pixel limit
    bad_npy = {"png": png_bytes(), "txt": b"x", "json": meta.encode(), "context.npy": b"junk", "pooled.npy": b"junk",
               "latent.npy": b"junk"}  # fmt: skip
    s._decode_one(bad_npy, "u:n")
    assert s._skips.examples["decompression_bomb"][0].startswith("u:big: ")
    assert s._skips.examples["corrupt_tar_member"] == [f"u:n: npy: {m}" for m in _npy_errors(3)]


def _npy_errors(count: int) -> list[str]:
    import numpy as np

    try:
        np.load(io.BytesIO(b"junk"), allow_pickle=False)
    except ValueError as err:
        return [str(err)] * count
    raise AssertionError("junk loaded")


def test_shuffled_tags_change_order_between_epochs() -> None:
    s = stream([], template_lines=["[filewords]"], shuffle_tags=True)
    seen = set()
    for epoch in range(6):
        s.set_epoch(epoch)
        caption = s._decode_one({"png": png_bytes(), "txt": b"a,b,c,d,e,f"}, "w")["caption"]
        assert sorted(caption.split(",")) == list("abcdef")
        seen.add(caption)
    assert len(seen) > 1


def resampled_shas(urls: list[str], epoch: int = 0, **kw) -> list[str]:
    from itertools import islice

    s = stream(urls, resampled=True, batch_size=1, shuffle=False, **kw)
    s.set_epoch(epoch)
    return [b["sha"][0] for b in islice(iter(s), 16) if "sha" in b]


def test_resampled_streams_are_endless_and_seeded_by_seed_epoch_rank_and_worker(tmp_path: Path, monkeypatch) -> None:
    urls = [write_tar(tmp_path / f"r{i}.tar", [(f"{i}.png", png_bytes(colour=(i * 40, 0, 0))), (f"{i}.txt", b"x")])
            for i in range(4)]  # fmt: skip
    first = resampled_shas(urls)
    assert len(first) == 16 and len(set(first)) > 1  # 4 one-sample shards, drawn again and again
    assert resampled_shas(urls) == first  # deterministic
    assert resampled_shas(urls, epoch=1, seed=4) == first  # seeded by seed + epoch: 4 + 1 == 5 + 0
    assert resampled_shas(urls, epoch=3) != first
    assert resampled_shas(urls, rank=1, world_size=2) != first  # another rank draws another stream
    monkeypatch.setattr(webdata, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    assert resampled_shas(urls) != first  # another worker draws another stream


def test_one_usable_sample_short_of_a_batch_is_a_batch_of_one(tmp_path: Path) -> None:
    url = write_tar(tmp_path / "one.tar", [("0.png", png_bytes()), ("0.txt", b"x")])
    batches = list(stream([url], batch_size=2, shuffle=False))
    assert [len(b["sha"]) for b in batches] == [1]  # a single pass keeps the short last batch: no error, no loss


def test_resampled_sample_shuffle_only_with_shuffle_and_a_buffer(tmp_path: Path, monkeypatch) -> None:
    url = write_tar(tmp_path / "s.tar", [("0.png", png_bytes()), ("0.txt", b"x")])
    calls: list = []

    def shuffle(bufsize=None, initial=None, seed=None):  # noqa: ANN001
        calls.append(bufsize)
        return lambda src: src

    monkeypatch.setattr(webdata.wds, "shuffle", shuffle)
    for options in (dict(shuffle=False, shuffle_buffer=50), dict(shuffle=True, shuffle_buffer=1),
                    dict(shuffle=True, shuffle_buffer=2)):  # fmt: skip
        s = stream([url], resampled=True, epoch_batches=1, batch_size=1, **options)
        assert sum("sha" in b for b in s) == 1
    assert calls == [2]


def truncated_tar(tmp_path: Path) -> str:
    members = [("0.png", png_bytes(colour=(1, 2, 3))), ("0.txt", b"kept"), ("1.png", png_bytes(colour=(9, 9, 9))),
               ("1.txt", b"lost")]  # fmt: skip
    url = write_tar(tmp_path / "cut.tar", members)
    with tarfile.open(url) as tf:
        cut = tf.getmember("1.png").offset_data + 20
    Path(url).write_bytes(Path(url).read_bytes()[:cut])  # the file ends inside the second sample's image
    return url


def test_a_cut_shard_keeps_what_came_before_in_the_held_out_set(tmp_path: Path) -> None:
    url = truncated_tar(tmp_path)
    s = stream([url])
    assert [i["filewords"] for i in s.first_samples(url, 5)] == ["kept"]
    assert dict(s._skips.counts) == {"corrupt_tar_member": 1, "corrupt_shard": 1}


def test_a_new_stream_starts_at_epoch_zero() -> None:
    urls = [f"s{i}.tar" for i in range(12)]
    explicit = stream(urls)
    explicit.set_epoch(0)
    assert [d["url"] for d in stream(urls)._pass_urls(0)] == [d["url"] for d in explicit._pass_urls(0)]
