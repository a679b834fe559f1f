"""data.val_count: held-out images chosen by content, excluded from training, independent of the run seed."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers.fakes import FakeEncoder
from helpers.images import make_folder

from hyperlit.data import FolderDataModule, WebDataModule, make_shards


def folder_dm(path, **kw):
    kw.setdefault("resolution", 64)
    kw.setdefault("cache_dir", None)
    kw.setdefault("latent_sampling", "deterministic")
    kw.setdefault("shuffle", False)
    kw.setdefault("batch_size", 1)
    dm = FolderDataModule(path=str(path), encoder=FakeEncoder(), **kw)
    dm.setup("fit")
    return dm


def trained_latents(batches) -> list[torch.Tensor]:
    return [lat for b in batches for lat in b["latents"]]


def test_folder_holds_out_the_smallest_content_keys(tmp_path):
    folder = make_folder(tmp_path / "d", n=8)
    shas = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.png"))
    dm = folder_dm(folder, val_count=2, template="subject_filewords")
    assert [h.key for h in dm.held_out] == shas[:2]
    training = trained_latents(dm.train_dataloader())
    assert len(training) == 6
    for held in dm.held_out:
        assert held.caption in {f"tag{i}, colour {i}, shape" for i in range(8)}
        assert held.caption in held.prompt  # the training prompt of that image: the template with its filewords
        assert not any(torch.equal(held.latents, lat) for lat in training)
    # the held-out latents are the images' scaled posterior means, the same whatever the run seed
    all_dm = folder_dm(folder, val_count=0)
    everything = trained_latents(all_dm.train_dataloader())
    for held in dm.held_out:
        assert any(torch.equal(held.latents, lat) for lat in everything)
    other_seed = folder_dm(folder, val_count=2, template="subject_filewords", seed=7, latent_sampling="once")
    assert [(h.key, h.prompt) for h in other_seed.held_out] == [(h.key, h.prompt) for h in dm.held_out]
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(other_seed.held_out, dm.held_out, strict=True))


def test_no_validation_by_default_and_at_most_a_quarter_held_out(tmp_path, caplog):
    folder = make_folder(tmp_path / "d", n=7)
    assert folder_dm(folder).held_out == []
    with caplog.at_level("WARNING"):
        dm = folder_dm(folder, val_count=3)
    assert len(dm.held_out) == 1 and len(trained_latents(dm.train_dataloader())) == 6  # 7 // 4
    assert "data.val_count=3: holding out 1 of the 7 usable images" in caplog.text
    small = folder_dm(make_folder(tmp_path / "small", n=3), val_count=2)
    assert small.held_out == [] and len(trained_latents(small.train_dataloader())) == 3
    with pytest.raises(ValueError, match=r"data.val_count=-1 is not allowed"):
        FolderDataModule(path=str(folder), resolution=64, val_count=-1)


def test_webdataset_holds_out_the_first_samples_of_the_first_shard(tmp_path):
    folder = make_folder(tmp_path / "d", n=10)
    make_shards(folder, tmp_path / "s", samples_per_shard=8)
    urls = str(tmp_path / "s" / "shard-{000000..000001}.tar")
    first_two = sorted(folder.glob("*.png"))[:2]  # make_shards writes files in name order
    expected = [hashlib.sha256(p.read_bytes()).hexdigest() for p in first_two]
    enc = FakeEncoder()
    dm = WebDataModule(
        urls=urls,
        encoder=enc,
        resolution=64,
        num_workers=0,
        shuffle_buffer=0,
        val_count=2,
        latent_sampling="deterministic",
    )
    dm.setup("fit")
    assert [h.key for h in dm.held_out] == expected
    seen = []
    for batch in dm.train_dataloader():
        seen += batch["sha"]
        dm.on_after_batch_transfer(batch, 0)
    assert len(seen) == 8 and not set(seen) & set(expected)
    # a first shard of 2 samples is too small to give any away: at most a quarter is held out
    make_shards(make_folder(tmp_path / "tiny", n=2), tmp_path / "t", samples_per_shard=2)
    small = WebDataModule(urls=str(tmp_path / "t" / "shard-000000.tar"), encoder=enc, resolution=64, num_workers=0,
                          shuffle_buffer=0, val_count=2)  # fmt: skip
    small.setup("fit")
    assert small.held_out == [] and sum(len(b["sha"]) for b in small.train_dataloader()) == 2
    # the held-out latents are the scaled posterior means of those images
    ref = folder_dm(folder, val_count=0)
    everything = trained_latents(ref.train_dataloader())
    for held in dm.held_out:
        assert any(torch.allclose(held.latents, lat, atol=1e-6) for lat in everything)
