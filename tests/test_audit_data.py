"""Audit (issue 14): repair counts survive the disk cache (first run and cached rerun), and the fixed prompt
is the exact A1111 string."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers.audit_oracles import expected_fixed_prompts
from helpers.fakes import FakeEncoder
from helpers.images import make_folder
from PIL import Image

from hyperlit.data import FolderDataModule


def _bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def repair_folder(root):
    """Three clean RGB images plus one file per repaired colour mode; returns the expected counts."""
    folder = make_folder(root, n=3)
    (folder / "rgba.png").write_bytes(_bytes(Image.new("RGBA", (64, 64), (10, 20, 30, 128))))
    (folder / "cmyk.jpg").write_bytes(_bytes(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"))
    pal = Image.new("RGB", (64, 64), (10, 120, 200)).convert("P", palette=Image.ADAPTIVE, colors=8)
    (folder / "pal.png").write_bytes(_bytes(pal))
    (folder / "deep.png").write_bytes(_bytes(Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))))
    # Oracle: the files' modes as PIL reads them, mapped to the kinds the spec names. A 16-bit grey image is
    # rescaled to 8-bit grey, then converted to RGB: two repairs.
    modes = {p.name: Image.open(p).mode for p in folder.iterdir() if p.suffix in (".png", ".jpg")}
    assert modes["rgba.png"] == "RGBA" and modes["cmyk.jpg"] == "CMYK" and modes["pal.png"] == "P"
    assert modes["deep.png"].startswith("I")
    return folder, {
        "converted_alpha": 1,
        "converted_cmyk": 1,
        "converted_palette": 1,
        "converted_16bit": 1,
        "converted_grayscale": 1,
    }


def load(folder, cache, enc, **kw):
    dm = FolderDataModule(
        path=str(folder), encoder=enc, cache_dir=str(cache), resolution=64, batch_size=1, shuffle=False, **kw
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm, list(dm.train_dataloader())


@pytest.mark.parametrize("prepare", [True, False], ids=["prepare_data+setup", "setup-only"])
def test_repair_counts_with_the_disk_cache_on_first_run_and_cached_rerun(tmp_path, prepare):
    folder, expected = repair_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    first_enc = FakeEncoder()
    if prepare:
        first, batches = load(folder, cache, first_enc)
    else:  # a rank that did not run prepare_data encodes (and writes) in setup
        first = FolderDataModule(
            path=str(folder), encoder=first_enc, cache_dir=str(cache), resolution=64, batch_size=1, shuffle=False
        )
        first.setup("fit")
        batches = list(first.train_dataloader())
    assert first_enc.images_encoded == 7 and len(batches) == 7
    assert dict(first.skipped) == expected

    again = FakeEncoder()
    second, batches = load(folder, cache, again)
    assert again.image_calls == 0  # every latent came from the cache...
    assert dict(second.skipped) == expected  # ...and the repairs are still reported, once each
    assert len(batches) == 7


def test_fixed_prompt_is_the_exact_a1111_string_in_every_epoch_and_run(tmp_path):
    folder = make_folder(tmp_path / "d", n=5)
    expected = expected_fixed_prompts(folder, "shapes")
    assert len(set(expected)) == 5
    for seed in (11, 12):  # the run seed does not change the line choice (cached contexts stay valid)
        dm = FolderDataModule(
            path=str(folder), encoder=FakeEncoder(), cache_dir=None, resolution=64, batch_size=5, shuffle=False,
            name="shapes", seed=seed,
        )  # fmt: skip
        dm.setup("fit")
        for _epoch in range(2):
            (batch,) = list(dm.train_dataloader())
            assert batch["caption"] == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_vae_data_reports_each_repair_once_per_file_across_epochs_and_runs(tmp_path, workers):
    # The VAE task has no disk cache of pixels (only the in-memory posterior cache): every epoch decodes again,
    # and a repaired file must still be counted once, in this run and in a rerun.
    from hyperlit.data.pixeldatamodule import PixelDataModule

    folder, expected = repair_folder(tmp_path / "d")
    for _run in range(2):
        dm = PixelDataModule(str(folder), resolution=32, batch_size=1, val_count=0, num_workers=workers)
        dm.setup("fit")
        for _epoch in range(2):
            assert len(list(dm.train_dataloader())) == 7
        assert dict(dm.skipped) == expected
