"""Audit (issue 14, mutmut survivors of hyperlit.data.cache and hyperlit.data.records): what the latent and text
caches store and give back (placements, pooled embeddings, dtypes), the encoder call counts, the on-disk layout
and the handling of corrupt entries. Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers.fakes import FakeEncoder, text_vector
from helpers.images import encoded, png_bytes, rgba_half_png
from PIL import Image

from hyperlit.data import cache as cache_module
from hyperlit.data.cache import TensorCache, make_key
from hyperlit.data.folder import SourceItem
from hyperlit.data.images import Placement
from hyperlit.data.options import DataOptions
from hyperlit.data.records import encode_items, encode_prompts
from hyperlit.data.skips import SkipLog
from hyperlit.models.components import TextEmbedding


def png(size: tuple[int, int], seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return encoded(Image.fromarray(pixels))


# 3 wide (64x32) and 2 tall (32x48) images; captions with one repeat: 4 unique prompts
SOURCES = [("w0", (64, 32), "a"), ("w1", (64, 32), "b"), ("w2", (64, 32), "c"), ("t0", (32, 48), "a"),
           ("t1", (32, 48), "d")]  # fmt: skip


def items() -> list[SourceItem]:
    return [SourceItem(where, caption, data=png(size, seed)) for seed, (where, size, caption) in enumerate(SOURCES)]


def options(tmp_path: Path, **kw) -> DataOptions:
    template = tmp_path / "filewords.txt"
    template.write_text("[filewords]\n")  # prompt = caption: the unique prompts are the unique captions
    return DataOptions(resolution=32, bucket_step=8, encode_batch_size=2, template=str(template), **kw)


class PooledEncoder(FakeEncoder):
    """Like SDXL: a pooled vector per prompt besides the context."""

    def encode_prompts(self, captions: list[str]) -> TextEmbedding:
        context = self.encode_text(captions)
        return TextEmbedding(context, context[:, 0, :8] * 2)


def test_bucketed_records_and_prompts_come_back_from_the_cache_exactly(tmp_path: Path) -> None:
    opts, cache = options(tmp_path, buckets=True), str(tmp_path / "cache")
    encoder = PooledEncoder()
    first = encode_items(items(), encoder, opts, SkipLog(), cache, write=True)
    # buckets for 32 px (area 1024, step 8, sizes 16..64): 64x32 (ratio 2) is nearest 40x24 (ratio 1.67; 48x16 is
    # 3); 32x48 (0.67) is nearest 24x40 (0.6). Per bucket batches of 2: wide 2 calls, tall 1 call.
    assert first.vae_calls == 3 and encoder.image_calls == 3
    placements = {r.where: r.placement for r in first.records}
    # crop mode: 64x32 scaled by max(40/64, 24/32) = 0.75 -> 48x24, centre crop (4, 0); 32x48 by 0.8333 -> 27x40
    # (rounded up to cover 24 wide... 26.67 -> 27), crop (1, 0)
    assert placements["w0"] == Placement((40, 24), (48, 24), (4, 0), (64, 32))
    assert placements["t0"] == Placement((24, 40), (27, 40), (1, 0), (32, 48))
    encode_prompts(first, encoder, opts, cache, write=True)
    # records come in flush order: w0 w1 (wide batch full), t0 t1 (tall batch full), then w2
    assert [r.where for r in first.records] == ["w0", "w1", "t0", "t1", "w2"]
    assert first.text_calls == 2 and encoder.prompts_encoded == ["a", "b", "d", "c"]  # 4 unique, 2 per call
    assert [r.context_index for r in first.records] == [0, 1, 0, 2, 3]
    for i, caption in enumerate("abdc"):
        assert torch.equal(first.contexts[i], text_vector(caption))
        assert torch.equal(first.pooled[i], text_vector(caption)[0, :8] * 2)
        # the text cache's file for this prompt, named by its documented key
        key = make_key("text", prompt=caption, text_encoder="fake-text_encoder-v1")
        assert (tmp_path / "cache" / "text" / key[:2] / f"{key}.safetensors").is_file()

    again = PooledEncoder()
    second = encode_items(items(), again, opts, SkipLog(), cache, write=True)
    encode_prompts(second, again, opts, cache, write=True)
    assert (second.vae_calls, second.text_calls, again.image_calls, again.text_calls) == (0, 0, 0, 0)
    assert {r.where: r.placement for r in second.records} == placements
    for a, b in zip(sorted(first.records, key=lambda r: r.where), sorted(second.records, key=lambda r: r.where),
                    strict=True):  # fmt: skip
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    # cache hits come in listing order, so the unique prompts are numbered a b c d now: compare per record
    for r in second.records:
        caption = r.caption
        assert torch.equal(second.contexts[r.context_index], text_vector(caption))
        assert torch.equal(second.pooled[r.context_index], text_vector(caption)[0, :8] * 2)


def test_without_buckets_every_image_is_placed_on_the_square(tmp_path: Path) -> None:
    enc = encode_items(items(), FakeEncoder(), options(tmp_path), SkipLog(), None, write=False)
    assert {r.placement.target for r in enc.records} == {(32, 32)}
    assert enc.vae_calls == 3  # one square bucket, batches of 2: 5 images -> 3 calls
    assert enc.text_calls == 0 and enc.contexts is None and enc.pooled is None  # no prompts encoded yet


def test_per_step_prompts_leave_no_fixed_context(tmp_path: Path) -> None:
    opts = options(tmp_path, shuffle_tags=True)
    enc = encode_items(items(), FakeEncoder(), opts, SkipLog(), None, write=False)
    encode_prompts(enc, FakeEncoder(), opts, None, write=False)
    assert enc.contexts is None and enc.text_calls == 0 and all(r.prompt is None for r in enc.records)


# --- TensorCache ----------------------------------------------------------------------------------------


def test_entries_live_under_kind_and_the_first_two_key_characters(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path, "latents")
    key = "ab" + "0" * 62
    cache.put(key, {"mean": torch.ones(2, dtype=torch.bfloat16)}, {"note": "x"})
    assert cache.path(key) == tmp_path / "latents" / "ab" / f"{key}.safetensors" and cache.path(key).is_file()
    tensors, meta = cache.get(key)
    assert tensors["mean"].dtype == torch.float32 and torch.equal(tensors["mean"], torch.ones(2))
    assert meta == {"note": "x", "key": key}


def test_an_entry_under_the_wrong_name_is_reported_deleted_and_missed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = TensorCache(tmp_path, "text")
    right, wrong = "cd" + "1" * 62, "cd" + "2" * 62
    cache.put(right, {"context": torch.zeros(1)})
    cache.path(right).rename(cache.path(wrong))
    with caplog.at_level(logging.WARNING, logger="hyperlit.data.cache"):
        assert cache.get(wrong) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"cache: corrupt entry {cache.path(wrong)} (entry key does not match its file name); recomputing it"
    ]
    assert not cache.path(wrong).exists()


def test_a_corrupt_entry_another_process_already_deleted_is_just_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = TensorCache(tmp_path, "text")
    key = "ef" + "3" * 62
    cache.put(key, {"context": torch.zeros(1)})

    def corrupt_and_gone(path, framework):  # noqa: ANN001
        Path(path).unlink()  # the other process saw the same corruption first and removed the file
        raise OSError("corrupt")

    monkeypatch.setattr(cache_module, "safe_open", corrupt_and_gone)
    assert cache.get(key) is None


def test_an_unreadable_file_is_counted_and_the_rest_still_encoded(tmp_path: Path) -> None:
    missing = SourceItem("gone.png", "x", path=tmp_path / "gone.png")  # listed, then deleted before reading
    skips = SkipLog()
    enc = encode_items([missing, *items()], FakeEncoder(), options(tmp_path), skips, None, write=False)
    assert sorted(r.where for r in enc.records) == ["t0", "t1", "w0", "w1", "w2"]
    assert dict(skips.counts) == {"unreadable": 1}
    assert skips.examples["unreadable"] == [f"gone.png: [Errno 2] No such file or directory: '{tmp_path / 'gone.png'}'"]


def test_alpha_maps_have_the_latent_shape_and_come_back_from_the_cache(tmp_path: Path) -> None:
    opts, cache = options(tmp_path, buckets=True), str(tmp_path / "cache")
    data = rgba_half_png((64, 32))
    first = encode_items([SourceItem("a.png", "x", data=data)], FakeEncoder(), opts, SkipLog(), cache, write=True)
    (rec,) = first.records
    # bucket 40x24 -> latents 5 wide, 3 high: the alpha map is h x w = 3 x 5, opaque on the left
    assert rec.mean.shape == (4, 3, 5) and rec.alpha.shape == (3, 5)
    assert float(rec.alpha[:, 0].min()) > 0.9 and float(rec.alpha[:, -1].max()) < 0.1
    key = make_key("latent", image=cache_module.sha256_bytes(data), vae="fake-vae-v1", target=(40, 24), resize="crop")
    assert (tmp_path / "cache" / "latents" / key[:2] / f"{key}.safetensors").is_file()  # the documented key
    again = FakeEncoder()
    second = encode_items([SourceItem("a.png", "x", data=data)], again, opts, SkipLog(), cache, write=True)
    assert again.image_calls == 0 and torch.equal(second.records[0].alpha, rec.alpha)


def test_cache_keys_are_the_sha256_of_sorted_json_with_kind_and_version() -> None:
    import hashlib

    key = make_key("latent", target=(32, 32), image="abc", where=Path("a/b.png"))
    blob = '{"image": "abc", "kind": "latent", "target": [32, 32], "v": "1", "where": "a/b.png"}'
    assert key == hashlib.sha256(blob.encode()).hexdigest()
    assert make_key("latent", image="abc", target=(32, 32), where=Path("a/b.png")) == key  # argument order: same key


def test_bad_and_repaired_images_are_counted_with_their_names_and_stretch_keeps_the_whole_image(tmp_path: Path):
    gray = png_bytes((64, 32), 90, mode="L")
    sources = [SourceItem("bad.png", "x", data=b"not an image"), SourceItem("gray.png", "y", data=gray)]
    skips = SkipLog()
    enc = encode_items(sources, FakeEncoder(), options(tmp_path, resize="stretch"), skips, None, write=False)
    assert dict(skips.counts) == {"not_an_image": 1, "converted_grayscale": 1}
    assert skips.examples == {
        "not_an_image": ["bad.png: not a readable image format"],
        "converted_grayscale": ["gray.png"],
    }
    (rec,) = enc.records
    assert rec.where == "gray.png" and rec.placement == Placement((32, 32), (32, 32), (0, 0), (64, 32))


def test_repairs_read_back_from_the_cache_name_the_file(tmp_path: Path) -> None:
    opts, cache = options(tmp_path), str(tmp_path / "cache")
    source = [SourceItem("gray.png", "y", data=png_bytes((32, 32), 90, mode="L"))]
    encode_items(source, FakeEncoder(), opts, SkipLog(verbose=False), cache, write=True)
    again, skips = FakeEncoder(), SkipLog(verbose=False)
    encode_items(source, again, opts, skips, cache, write=True)
    assert again.image_calls == 0 and skips.examples == {"converted_grayscale": ["gray.png"]}
