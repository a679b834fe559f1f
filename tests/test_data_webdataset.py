"""webdataset: shards from make_shards load through the DataModule; precomputed latents skip the VAE."""

from __future__ import annotations

import hashlib
import io
import re
import signal
import tarfile
from contextlib import contextmanager

import pytest
import torch
from helpers.config import compose_config
from helpers.fakes import FakeEncoder
from helpers.images import make_folder, png_bytes
from helpers.paths import SAMPLE_DIR
from helpers.tars import write_tar
from hydra.utils import instantiate

from hyperlit.data import FolderDataModule, WebDataModule, make_shards
from hyperlit.errors import bad_input_message


def wdm(urls, enc, **kw):
    kw.setdefault("resolution", 64)
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 0)
    dm = WebDataModule(urls=urls, encoder=enc, **kw)
    dm.setup("fit")
    return dm


def finished(dm):
    """Iterate the loader and apply the after-transfer hook as Lightning would."""
    return [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]


def test_shards_with_precomputed_latents_match_folder_and_skip_encoders(tmp_path):
    folder = SAMPLE_DIR
    maker = FakeEncoder()
    shards = make_shards(folder, tmp_path / "shards", encoder=maker, resolution=64, name="shapes", samples_per_shard=5)
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(4)]  # 16 images, 5 per shard
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
    assert "00000000.png" in names and "00000000.latent.npy" in names and "00000000.context.npy" in names
    enc = FakeEncoder()
    dm = wdm(
        str(tmp_path / "shards" / "shard-{000000..000003}.tar"),
        enc,
        batch_size=4,
        name="shapes",
        latent_sampling="deterministic",
        shuffle=False,
    )
    got = finished(dm)
    assert enc.image_calls == 0 and enc.text_calls == 0  # both came from the shards
    # Reference: the folder DataModule on the same images with the same rules.
    ref_dm = FolderDataModule(
        path=str(folder),
        encoder=FakeEncoder(),
        resolution=64,
        name="shapes",
        batch_size=16,
        latent_sampling="deterministic",
        shuffle=False,
        cache_dir=None,
    )
    ref_dm.setup("fit")
    (ref,) = list(ref_dm.train_dataloader())
    by_caption = {
        c: (lat, ctx, sz)
        for c, lat, ctx, sz in zip(ref["caption"], ref["latents"], ref["context"], ref["sizes"], strict=True)
    }
    seen = 0
    for b in got:
        for c, lat, ctx, sz in zip(b["caption"], b["latents"], b["context"], b["sizes"], strict=True):
            assert torch.allclose(lat, by_caption[c][0], atol=1e-6) and torch.equal(ctx, by_caption[c][1])
            assert torch.equal(sz, by_caption[c][2])  # the same size conditioning (SDXL time_ids) as the folder
            seen += 1
    assert seen == 16 and set(got[0]) == {"caption", "latents", "context", "sizes"}


def test_shards_without_latents_encode_on_device(tmp_path):
    folder = make_folder(tmp_path / "d", n=6)
    make_shards(folder, tmp_path / "s", samples_per_shard=3)
    enc = FakeEncoder()
    dm = wdm(str(tmp_path / "s" / "shard-{000000..000001}.tar"), enc, batch_size=2, template="none")
    got = finished(dm)
    assert len(got) == 3 and enc.images_encoded == 6 and enc.text_calls == 3
    assert all(b["latents"].shape == (2, 4, 8, 8) and b["context"].shape == (2, 77, 32) for b in got)
    assert all(c == "picture" for b in got for c in b["caption"])


def test_stale_precomputed_latents_are_reencoded(tmp_path):
    make_shards(
        make_folder(tmp_path / "d", n=4), tmp_path / "s", encoder=FakeEncoder(), resolution=64, samples_per_shard=4
    )
    enc = FakeEncoder(vae_version="v2")
    dm = wdm(str(tmp_path / "s" / "shard-000000.tar"), enc, batch_size=2)
    finished(dm)
    assert enc.images_encoded == 4 and dm.skipped["stale_latent"] == 4


def test_epoch_length_and_ranks_take_equal_steps(tmp_path):
    make_shards(make_folder(tmp_path / "d", n=8), tmp_path / "s", samples_per_shard=2)
    urls = str(tmp_path / "s" / "shard-{000000..000003}.tar")
    counts, seen = [], []
    for rank in range(2):
        dm = WebDataModule(
            urls=urls,
            encoder=FakeEncoder(),
            resolution=64,
            batch_size=2,
            epoch_length=14,
            num_workers=0,
            shuffle_buffer=0,
        )
        dm.trainer = type("T", (), {"global_rank": rank, "world_size": 2, "current_epoch": 0})()
        dm.setup("fit")
        assert len(dm.stream) == 4  # ceil(14 / (2 * 2))
        batches = list(dm.train_dataloader())
        counts.append(len(batches))
        seen.append({c for b in batches for c in b["caption"]})
    assert counts == [4, 4]
    assert len(seen[0] | seen[1]) == 8  # repeated passes: every sample reached one of the ranks
    # epoch_length = the sample count: one pass, the ranks' samples are disjoint and cover the set
    shas = []
    for rank in range(2):
        dm = WebDataModule(urls=urls, encoder=FakeEncoder(), resolution=64, batch_size=2, epoch_length=8,
                           num_workers=0, shuffle_buffer=0)  # fmt: skip
        dm.trainer = type("T", (), {"global_rank": rank, "world_size": 2, "current_epoch": 0})()
        dm.setup("fit")
        shas.append([sha for b in dm.train_dataloader() for sha in b["sha"]])
    assert len(shas[0]) == len(shas[1]) == 4 and not set(shas[0]) & set(shas[1])
    assert set(shas[0]) | set(shas[1]) == {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "d").glob("*.png")
    }


def test_resampled_needs_epoch_length_and_yields_exactly(tmp_path):
    make_shards(make_folder(tmp_path / "d", n=4), tmp_path / "s", samples_per_shard=2)
    urls = [str(tmp_path / "s" / "shard-000000.tar"), str(tmp_path / "s" / "shard-000001.tar")]
    with pytest.raises(ValueError, match="data.epoch_length"):
        wdm(urls, FakeEncoder(), resampled=True)
    dm = wdm(urls, FakeEncoder(), resampled=True, epoch_length=10, batch_size=2)
    assert len(list(dm.train_dataloader())) == 5


def test_workers_split_shards_and_count_is_exact(tmp_path):
    make_shards(make_folder(tmp_path / "d", n=8), tmp_path / "s", samples_per_shard=2)
    urls = str(tmp_path / "s" / "shard-{000000..000003}.tar")
    dm = wdm(
        urls,
        FakeEncoder(),
        batch_size=2,
        num_workers=2,
        epoch_length=10,
        shuffle_buffer=4,
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    # one pass (epoch_length = the sample count): with 2 workers each sample comes exactly once
    dm = wdm(urls, FakeEncoder(), batch_size=2, num_workers=2, epoch_length=8, shuffle_buffer=4)
    got = sorted(sha for b in dm.train_dataloader() for sha in b["sha"])
    assert got == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "d").glob("*.png"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_single_pass_keeps_each_workers_short_last_batch(tmp_path, num_workers):
    make_shards(make_folder(tmp_path / "d", n=10), tmp_path / "s", samples_per_shard=5)
    urls = str(tmp_path / "s" / "shard-{000000..000001}.tar")
    dm = wdm(urls, FakeEncoder(), batch_size=4, num_workers=num_workers, shuffle_buffer=4, template="none")
    got = finished(dm)
    # one worker: 10 samples in batches of 4, 4, 2; two workers: one shard of 5 each, batches of 4 and 1 each
    expected_sizes = [4, 4, 2] if num_workers == 0 else [4, 4, 1, 1]
    assert sorted(len(b["caption"]) for b in got) == sorted(expected_sizes)
    assert all(b["latents"].shape[1:] == (4, 8, 8) and b["context"].shape[1:] == (77, 32) for b in got)
    assert all(b["latents"].shape[0] == b["context"].shape[0] == b["sizes"].shape[0] for b in got)
    written = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "d").glob("*.png")}
    dm = wdm(urls, FakeEncoder(), batch_size=4, num_workers=num_workers, shuffle_buffer=4)
    seen = sorted(sha for b in dm.train_dataloader() for sha in b["sha"])
    assert seen == sorted(written)  # every sample of the pass exactly once


def test_worker_skip_counts_reach_the_main_process(tmp_path):
    folder = make_folder(tmp_path / "d", n=8)
    (folder / "zz-empty.png").write_bytes(b"")  # make_shards skips it, so add it to a shard by hand
    make_shards(folder, tmp_path / "s", samples_per_shard=2)
    extra = tmp_path / "s" / "shard-000004.tar"
    write_tar(extra, [("e.png", b""), ("e.txt", b"x"), ("f.png", png_bytes()), ("f.txt", b"\xff\xfe bad")])
    urls = str(tmp_path / "s" / "shard-{000000..000004}.tar")
    dm = wdm(urls, FakeEncoder(), batch_size=3, num_workers=2, shuffle=False)
    batches = list(dm.train_dataloader())
    assert all("_skipped" not in b for b in batches)
    # worker 0 reads shards 0, 2, 4 (2 + 2 + 1 usable: batches of 3 and 2), worker 1 shards 1, 3 (4: 3 and 1)
    assert sorted(len(b["caption"]) for b in batches) == [1, 2, 3, 3]
    assert dm.skipped["zero_byte"] == 1 and dm.skipped["caption_not_utf8"] == 1


def test_url_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.urls"):
        wdm(str(tmp_path / "nope-{0..1}.tar"), FakeEncoder())
    with pytest.raises(ValueError, match="data.urls"):
        wdm("", FakeEncoder())
    make_shards(make_folder(tmp_path / "d", n=2), tmp_path / "s", samples_per_shard=2)
    with pytest.raises(ValueError, match="data.num_workers"):
        wdm(str(tmp_path / "s" / "shard-000000.tar"), FakeEncoder(), num_workers=2)


def test_corrupt_tar_and_members_are_counted_and_loading_continues(tmp_path):
    good = tmp_path / "good.tar"
    write_tar(
        good,
        [
            (f"{i:04d}.{ext}", data)
            for i in range(4)
            for ext, data in (("png", png_bytes((64, 64), (i * 40, 10, 10))), ("txt", b"tag"))
        ],
    )
    bad_members = tmp_path / "members.tar"
    write_tar(
        bad_members,
        [
            ("a.png", b"garbage"),
            ("a.txt", b"x"),
            ("b.txt", b"caption only"),
            ("c.png", png_bytes()),
            ("c.txt", b"ok"),
            ("c.latent.npy", b"\x93NUMPY broken"),
            ("c.json", b'{"vae": "fake-vae-v1", "target": [64, 64], "resize": "crop"}'),
        ],
    )
    truncated = tmp_path / "cut.tar"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for i in range(3):
            data = png_bytes((64, 64), (5, 5, i))
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    sizes = [len(png_bytes((64, 64), (5, 5, i))) for i in range(2)]
    cut = 512 + -(-sizes[0] // 512) * 512 + 512 + sizes[1] // 2  # inside the second member's data
    truncated.write_bytes(raw.getvalue()[:cut])
    enc = FakeEncoder()
    dm = wdm([str(good), str(bad_members), str(truncated)], enc, batch_size=1, shuffle=False)
    got = finished(dm)
    assert dm.skipped["not_an_image"] == 1  # a.png
    assert dm.skipped["missing_image"] == 1  # b has only a caption
    assert dm.skipped["corrupt_tar_member"] == 2  # c.latent.npy unreadable + the cut member of cut.tar
    assert dm.skipped["corrupt_shard"] == 1  # the rest of cut.tar is lost
    captions = [c for b in got for c in b["caption"]]
    assert len(captions) == 6  # 4 good, c (re-encoded from pixels), the intact first member of cut.tar
    assert enc.images_encoded == len(captions)


def cut_in_caption(path, count):
    """A shard of `count` png+txt samples whose file ends inside the last sample's caption; returns its URL and
    the content keys of the samples before it."""
    images = [png_bytes((64, 64), (30 * i, 5, 5)) for i in range(count)]
    url = write_tar(path, [(f"{i:04d}.{ext}", data) for i in range(count)
                           for ext, data in (("png", images[i]), ("txt", b"tag %d" % i))])  # fmt: skip
    with tarfile.open(url) as tf:
        cut = tf.getmember(f"{count - 1:04d}.txt").offset_data + 2
    path.write_bytes(path.read_bytes()[:cut])
    return url, {hashlib.sha256(image).hexdigest() for image in images[:-1]}


@pytest.mark.parametrize("first_cut", [False, True])
def test_resampled_truncated_shard_skips_and_counts_the_cut_sample(tmp_path, caplog, first_cut):
    # a shard of 3 good samples, then one cut inside its caption, drawn again and again
    url, good = cut_in_caption(tmp_path / "cut.tar", 4)
    urls, cut_key = [url], "0003"
    if first_cut:  # plus a shard whose only sample is cut: two draws in a row used to join it with itself
        first, _ = cut_in_caption(tmp_path / "first.tar", 1)
        urls, url, cut_key = [first, url], first, "0000"
    dm = wdm(urls, FakeEncoder(), resampled=True, epoch_length=24, batch_size=3, shuffle=False, template="none")
    batches = list(dm.train_dataloader())
    assert len(batches) == 8
    assert {sha for b in batches for sha in b["sha"]} == good  # no cut sample reaches a batch
    assert dm.skipped["truncated_sample"] >= 1 and "caption_empty" not in dm.skipped
    assert f"data: truncated_sample {url}:{cut_key} read only ['png']" in caplog.text  # names shard and sample


def test_nothing_usable_in_shards_is_an_error_with_reasons(tmp_path):
    bad = tmp_path / "bad.tar"
    write_tar(bad, [("a.png", b""), ("b.png", b"zzz")])
    dm = wdm(str(bad), FakeEncoder(), batch_size=1)
    with pytest.raises(ValueError, match="no usable sample") as err:
        list(dm.train_dataloader())
    assert "zero_byte: 1" in str(err.value) and "not_an_image: 1" in str(err.value)


def shape_tar(path, colours, keys):
    """A shard of one plain-colour PNG per key, each with a caption."""
    pairs = zip(keys, colours, strict=True)
    return write_tar(path, [m for k, c in pairs for m in ((f"{k}.png", png_bytes(colour=c)), (f"{k}.txt", b"a shape"))])


def test_a_rank_whose_shards_hold_only_held_out_copies_says_so(tmp_path):
    # shard 0: four distinct images, the first held out for validation; shard 1 (rank 1's only shard): two copies of
    # that held-out image under other keys. Rank 1 has nothing to train on, and its message must say why.
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    urls = [shape_tar(tmp_path / "s0.tar", colours, "abcd"), shape_tar(tmp_path / "s1.tar", colours[:1] * 2, "xy")]
    dm = WebDataModule(urls=urls, encoder=FakeEncoder(), resolution=64, batch_size=1, epoch_length=4, num_workers=0,
                       shuffle_buffer=0, shuffle=False, val_count=1)  # fmt: skip
    dm.trainer = type("T", (), {"global_rank": 1, "world_size": 2, "current_epoch": 0})()
    dm.setup("fit")
    assert [h.key for h in dm.held_out] == [hashlib.sha256(png_bytes(colour=colours[0])).hexdigest()]
    with pytest.raises(ValueError, match="no usable sample") as err:
        list(dm.train_dataloader())
    message = str(err.value)
    # the count is rank 1's own share of data.urls, not every shard
    assert message.startswith("data.urls: no usable sample in the 1 of 2 shard(s) that rank 1, DataLoader worker 0 "
                              "reads; reasons"), message  # fmt: skip
    assert message.endswith("reasons with counts:\n  held_out_copy: 2  (the same bytes as an image data.val_count "
                            "holds out for validation: never trained on)"), message  # fmt: skip
    assert "no files were found" not in message


class Hung(BaseException):
    """Not an Exception: the stream's handlers count and skip those (a bad tar member, an unreadable header)."""


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: an endless stream that never ends is the bug these tests guard against."""

    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def unusable_shards(tmp_path):
    garbage = [(f"{key}.{ext}", b"zzz" if ext == "png" else b"x") for key in "bc" for ext in ("png", "txt")]
    return [write_tar(tmp_path / "empty.tar", [("a.png", b""), ("a.txt", b"x")]),
            write_tar(tmp_path / "garbage.tar", garbage)]  # fmt: skip


@pytest.mark.parametrize("shuffle_buffer", [0, 50])
def test_resampled_shards_with_nothing_usable_are_an_error_not_an_endless_loop(tmp_path, shuffle_buffer):
    # every shard drawn at least once and each draw decoded to its end, with nothing usable: no draw ever will be
    dm = wdm(unusable_shards(tmp_path), FakeEncoder(), resampled=True, epoch_length=4, batch_size=2,
             shuffle_buffer=shuffle_buffer)  # fmt: skip
    with deadline(60), pytest.raises(ValueError, match="data.urls: no usable sample in 2 shard") as err:
        list(dm.train_dataloader())
    # the reasons with their counts (draws in seeded order: each shard at least once, the garbage one maybe more)
    assert re.search(r"\n  not_an_image: [1-9]\d*  e\.g\. .*garbage\.tar:b: not a readable image", str(err.value))
    assert re.search(r"\n  zero_byte: [1-9]\d*  e\.g\. .*empty\.tar:a: file is empty", str(err.value))
    assert dm.stream._dry.dry == set(dm.stream.urls)
    if not shuffle_buffer:  # no draw in flight: every complete draw's counters were dropped
        assert not dm.stream._dry.sizes and not dm.stream._dry.decoded


def test_resampled_nothing_usable_through_workers_is_one_line(tmp_path):
    dm = wdm(unusable_shards(tmp_path), FakeEncoder(), resampled=True, epoch_length=4, batch_size=2, num_workers=2,
             shuffle_buffer=50)  # fmt: skip
    with deadline(120), pytest.raises(ValueError, match="no usable sample") as err:
        list(dm.train_dataloader())
    assert "DataLoader worker process" in str(err.value)  # PyTorch re-raised it with the worker's traceback
    message = bad_input_message(err.value)
    assert message.startswith("data.urls: no usable sample in 2 shard(s); reasons with counts:"), message
    assert re.search(r"; not_an_image: [1-9]\d*  e\.g\. .*; zero_byte: [1-9]", message), message
    assert "\n" not in message and "Traceback" not in message and "File " not in message


def test_resampled_small_good_shard_behind_the_shuffle_buffer_is_no_false_alarm(tmp_path):
    # The buffer's initial fill (100) holds every draw of the 2-sample good shard while many bad samples are
    # decoded: the good shard was drawn, but no draw of it was decoded to its end, so it is not dry.
    bad = write_tar(tmp_path / "bad.tar", [(f"{i:03d}.png", b"") for i in range(40)])
    images = [png_bytes(colour=(60 * i, 9, 9)) for i in range(2)]
    good = write_tar(tmp_path / "good.tar", [(f"{i}.png", image) for i, image in enumerate(images)])
    dm = wdm([bad, good], FakeEncoder(), resampled=True, epoch_length=8, batch_size=2, shuffle_buffer=1000)
    loader = dm.train_dataloader()
    with deadline(120):
        epochs = [list(loader) for _ in range(3)]
    assert [len(batches) for batches in epochs] == [4, 4, 4]
    shas = {sha for batches in epochs for batch in batches for sha in batch["sha"]}
    assert shas == {hashlib.sha256(image).hexdigest() for image in images}
    assert dm.stream._dry is None  # a usable sample ends the bookkeeping: an endless healthy stream keeps none


def test_webdataset_config_composes(tmp_path):
    make_shards(make_folder(tmp_path / "d", n=2), tmp_path / "s", samples_per_shard=2)
    cfg = compose_config(
        None,
        [
            "+data=webdataset",
            f"data.urls={tmp_path / 's' / 'shard-000000.tar'}",
            "data.num_workers=0",
            "data.resolution=64",
        ],
    )
    dm = instantiate(cfg.data, encoder=FakeEncoder(), name="n", seed=1)
    assert isinstance(dm, WebDataModule)
    dm.setup("fit")
    assert len([dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]) == 2


def test_pipe_urls_with_braces(tmp_path):
    make_shards(make_folder(tmp_path / "d", n=4), tmp_path / "s", samples_per_shard=2)
    enc = FakeEncoder()
    dm = wdm(f"pipe:cat {tmp_path / 's' / 'shard-{000000..000001}.tar'}", enc, batch_size=2)
    assert dm.stream.urls == [f"pipe:cat {tmp_path / 's' / f'shard-00000{i}.tar'}" for i in range(2)]
    got = finished(dm)
    assert sum(len(b["caption"]) for b in got) == 4 and enc.images_encoded == 4
