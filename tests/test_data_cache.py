"""Disk caches: a second run calls no encoder; key changes invalidate; corrupt entries are recomputed."""

from __future__ import annotations

import logging

import torch
from helpers.fakes import FakeEncoder
from helpers.images import write_image

from hyperlit.data import FolderDataModule


def run(folder, cache, enc, **kw):
    kw.setdefault("resolution", 64)
    kw.setdefault("batch_size", 3)
    kw.setdefault("shuffle", False)
    dm = FolderDataModule(path=str(folder), encoder=enc, cache_dir=str(cache), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm, list(dm.train_dataloader())


def entries(cache, kind):
    return sorted((cache / kind).rglob("*.safetensors"))


def test_second_run_calls_no_encoder_and_gives_identical_batches(tmp_path, image_folder):
    folder, cache = image_folder(n=6), tmp_path / "cache"
    first = FakeEncoder()
    _, b1 = run(folder, cache, first)
    assert first.images_encoded == 6 and first.text_calls >= 1
    assert len(entries(cache, "latents")) == 6 and len(entries(cache, "text")) == 6
    second = FakeEncoder()
    _, b2 = run(folder, cache, second)
    assert second.image_calls == 0 and second.text_calls == 0
    for x, y in zip(b1, b2, strict=True):
        assert torch.equal(x["latents"], y["latents"]) and torch.equal(x["context"], y["context"])
        assert x["caption"] == y["caption"]
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob(".*"))  # atomic writes leave no temp files


def test_setup_alone_encodes_once_when_prepare_data_cached(tmp_path, image_folder):
    folder, cache = image_folder(n=4), tmp_path / "cache"
    enc = FakeEncoder()
    run(folder, cache, enc)  # prepare_data encodes, setup must only read
    assert enc.images_encoded == 4


def test_resolution_change_invalidates_latents_not_text(tmp_path, image_folder):
    folder, cache = image_folder(n=4, size=(128, 128)), tmp_path / "cache"
    run(folder, cache, FakeEncoder())
    enc = FakeEncoder()
    _, b = run(folder, cache, enc, resolution=128, batch_size=4)
    assert enc.images_encoded == 4 and enc.text_calls == 0
    assert b[0]["latents"].shape[-1] == 16
    assert len(entries(cache, "latents")) == 8


def test_model_change_and_resize_mode_invalidate(tmp_path, image_folder):
    folder, cache = image_folder(n=3, size=(96, 64)), tmp_path / "cache"
    run(folder, cache, FakeEncoder())
    other_vae = FakeEncoder(vae_version="v2")
    run(folder, cache, other_vae)
    assert other_vae.images_encoded == 3 and other_vae.text_calls == 0
    other_text = FakeEncoder(text_version="v2")
    run(folder, cache, other_text)
    assert other_text.images_encoded == 0 and other_text.text_calls >= 1
    stretch = FakeEncoder()
    run(folder, cache, stretch, resize="stretch")
    assert stretch.images_encoded == 3


def test_changed_image_bytes_miss(tmp_path, image_folder):
    folder, cache = image_folder(n=3), tmp_path / "cache"
    run(folder, cache, FakeEncoder())

    write_image(folder, "00-img0", "tag0, colour 0, shape", colour=(1, 2, 3))  # same name, new content
    enc = FakeEncoder()
    run(folder, cache, enc)
    assert enc.images_encoded == 1


def test_corrupt_entry_is_recomputed_with_warning(tmp_path, image_folder, caplog):
    folder, cache = image_folder(n=3), tmp_path / "cache"
    _, ref = run(folder, cache, FakeEncoder())
    victim = entries(cache, "latents")[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated file
    text_victim = entries(cache, "text")[0]
    text_victim.write_bytes(b"not a safetensors file")
    enc = FakeEncoder()
    with caplog.at_level(logging.WARNING):
        dm, got = run(folder, cache, enc)
    assert enc.images_encoded == 1 and enc.text_calls == 1 and len(enc.prompts_encoded) == 1
    assert any("corrupt entry" in r.message for r in caplog.records)
    for x, y in zip(ref, got, strict=True):
        assert torch.allclose(x["latents"], y["latents"]) and torch.equal(x["context"], y["context"])
    enc3 = FakeEncoder()
    run(folder, cache, enc3)  # repaired on disk
    assert enc3.image_calls == 0 and enc3.text_calls == 0


def test_varying_captions_cache_only_latents(tmp_path, image_folder):
    folder, cache = image_folder(n=3), tmp_path / "cache"
    enc = FakeEncoder()
    run(folder, cache, enc, tag_dropout=0.3)
    assert enc.text_calls == 0 and not (cache / "text").exists()
    assert len(entries(cache, "latents")) == 3


def test_no_cache_dir_encodes_in_memory_each_run(tmp_path, image_folder):
    folder = image_folder(n=2)
    enc = FakeEncoder()
    dm = FolderDataModule(path=str(folder), encoder=enc, cache_dir=None, resolution=64)
    dm.prepare_data()
    dm.setup("fit")
    assert enc.images_encoded == 2 and not list(tmp_path.rglob("*.safetensors"))
