"""SDXL data: per-sample sizes (time_ids) are the crops the pipeline made, buckets included; pooled text cached."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_sdxl import write_folder
from PIL import Image

from hyperlit.data import FolderDataModule
from hyperlit.models import load_components


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    return load_components(family="tiny_sdxl", path=str(write_folder(tmp_path_factory.mktemp("tiny_sdxl"))))


class PixelSpy:
    """The real components, recording every pixel batch handed to the VAE."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.pixels: list[torch.Tensor] = []

    def encode_images(self, pixels: torch.Tensor):
        self.pixels.extend(pixels)
        return self.inner.encode_images(pixels)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def coded_image(path: Path, size: tuple[int, int]) -> None:
    """Red = column index, green = row index: a crop shows up as the first column/row it starts at."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w)[None, :]
    arr[..., 1] = np.arange(h)[:, None]
    Image.fromarray(arr).save(path)


def to_byte(x: torch.Tensor) -> int:
    return round(float((x + 1) * 127.5))


def test_bucketed_sizes_are_the_crops_made(comps, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    coded_image(data / "wide.png", (200, 64))  # -> bucket 192x64, cropped 4 px from the left, no resize
    coded_image(data / "tall.png", (64, 300))  # -> bucket 64x256, cropped 22 px from the top, no resize
    (data / "wide.txt").write_text("wide")
    (data / "tall.txt").write_text("tall")
    spy = PixelSpy(comps)
    dm = FolderDataModule(
        path=str(data), encoder=spy, resolution=128, buckets=True, batch_size=1, cache_dir=str(tmp_path / "c"),
        template="none", shuffle=False,
    )  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and len(spy.pixels) == 2
    by_target = {(p.shape[2], p.shape[1]): p for p in spy.pixels}  # (w, h) -> the pixels the VAE saw
    for b in batches:
        orig_h, orig_w, top, left, th, tw = b["sizes"][0].tolist()
        assert b["latents"].shape[-2:] == (th // 8, tw // 8)  # target is the bucket actually used
        pixels = by_target[(tw, th)]
        assert (orig_w, orig_h) in ((200, 64), (64, 300))
        # no resize happened (one side already fits), so pixel (0, 0) of the crop is source pixel (left, top)
        assert to_byte(pixels[0, 0, 0]) == left and to_byte(pixels[1, 0, 0]) == top
        assert (left > 0) == (orig_w == 200) and (top > 0) == (orig_h == 300)
        cond = comps.condition(b["caption"], b["sizes"], text=None)
        assert cond.unet_kwargs["added_cond_kwargs"]["time_ids"][0].tolist() == [orig_h, orig_w, top, left, th, tw]
        # precomputed text and pooled from the cache equal a fresh encoding
        fresh = comps.encode_prompts(b["caption"])
        torch.testing.assert_close(b["context"], fresh.context)
        torch.testing.assert_close(b["pooled"], fresh.pooled)

    # a second run reads latents, sizes and pooled embeddings from the cache: no encoder call, same batches
    again = PixelSpy(comps)
    calls = []
    again.encode_prompts = lambda captions: calls.append(captions)  # type: ignore[method-assign]
    dm2 = FolderDataModule(
        path=str(data), encoder=again, resolution=128, buckets=True, batch_size=1, cache_dir=str(tmp_path / "c"),
        template="none", shuffle=False,
    )  # fmt: skip
    dm2.setup("fit")
    second = list(dm2.train_dataloader())
    assert again.pixels == [] and calls == []
    for a, b in zip(batches, second, strict=True):
        assert torch.equal(a["sizes"], b["sizes"]) and torch.equal(a["pooled"], b["pooled"])


def test_sdxl_shards_carry_pooled_and_sizes(comps, tmp_path):
    """make-shards with an SDXL encoder stores pooled.npy; streaming them gives the folder's conditioning."""
    from hyperlit.data.shards import make_shards
    from hyperlit.data.webdatamodule import WebDataModule

    data = tmp_path / "data"
    data.mkdir()
    coded_image(data / "wide.png", (200, 64))
    coded_image(data / "tall.png", (64, 300))
    urls = make_shards(data, tmp_path / "shards", encoder=comps, resolution=64, template="none", samples_per_shard=8)
    import tarfile

    with tarfile.open(urls[0]) as tar:
        assert sum(n.endswith(".pooled.npy") for n in tar.getnames()) == 2
    calls = []
    spy = PixelSpy(comps)
    spy.encode_prompts = lambda captions: calls.append(captions)  # type: ignore[method-assign]
    dm = WebDataModule(
        urls=[str(u) for u in urls], encoder=spy, resolution=64, batch_size=2, template="none", num_workers=0,
        shuffle_buffer=0, latent_sampling="deterministic",
    )  # fmt: skip
    dm.setup("fit")
    (batch,) = [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert spy.pixels == [] and calls == []  # latents, context and pooled all came from the shards
    fresh = comps.encode_prompts(batch["caption"])
    torch.testing.assert_close(batch["pooled"], fresh.pooled)
    torch.testing.assert_close(batch["context"], fresh.context)
    # square 64x64 center crops: (200, 64) -> cropped 68 px from the left; (64, 300) -> 118 px from the top
    assert sorted(batch["sizes"].tolist()) == [[64, 200, 0, 68, 64, 64], [300, 64, 118, 0, 64, 64]]


def test_make_shards_cli_with_an_sdxl_model(comps, tmp_path):
    """`hyperlit make-shards --model <sdxl family>` stores the pooled embedding next to latents and context."""
    import tarfile

    from helpers.tiny_sdxl import write_folder as write_model

    from hyperlit import cli

    model = write_model(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    coded_image(data / "a.png", (64, 96))
    argv = ["make-shards", str(data), str(tmp_path / "shards"), "--model", "tiny_sdxl", "--model-path", str(model),
            "--resolution", "64", "--template", "none"]  # fmt: skip
    assert cli.main(argv) == 0
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        names = sorted(n.split(".", 1)[1] for n in tar.getnames())
        pooled = np.load(
            io.BytesIO(tar.extractfile(next(n for n in tar.getnames() if n.endswith(".pooled.npy"))).read())
        )
    assert names == ["context.npy", "json", "latent.npy", "png", "pooled.npy", "txt"]
    torch.testing.assert_close(torch.from_numpy(pooled), comps.encode_prompts(["picture"]).pooled[0])
