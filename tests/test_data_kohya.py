"""kohya's dataset conventions in the folder source: `<repeats>_<name>/` folders and `data.caption_extension`,
mixed with A1111's top-level images and `[filewords]` templates; held-out images stay out of training, repeats too."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers.fakes import FakeEncoder
from helpers.images import png_bytes

from hyperlit.data.datamodule import FolderDataModule
from hyperlit.data.folder import scan_folder
from hyperlit.data.skips import SkipLog


def _image(path: Path, colour: tuple[int, int, int], caption: str | None = None, ext: str = ".txt") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour=colour))
    if caption is not None:
        path.with_suffix(ext).write_text(caption)


def test_repeat_folders_and_caption_extension_are_scanned(tmp_path):
    _image(tmp_path / "top.png", (255, 0, 0), "red top", ext=".caption")
    _image(tmp_path / "10_style" / "a.png", (0, 255, 0), "green a", ext=".caption")
    _image(tmp_path / "3_other" / "b.png", (0, 0, 255), "ignored txt")  # only a .txt: caption from the name
    _image(tmp_path / "notes" / "c.png", (9, 9, 9), "not read")  # no repeat count: not a dataset folder
    items = scan_folder(tmp_path, SkipLog(verbose=False), ".caption")
    got = {Path(i.where).relative_to(tmp_path).as_posix(): (i.caption, i.repeats) for i in items}
    assert got == {"top.png": ("red top", 1), "10_style/a.png": ("green a", 10), "3_other/b.png": ("b", 3)}


@pytest.mark.parametrize("bad", ["txt", ".", "", "a.b", ".x/y"])
def test_caption_extension_without_a_dot_is_one_line_error(tmp_path, bad):
    with pytest.raises(ValueError) as err:
        scan_folder(tmp_path, SkipLog(verbose=False), bad)
    assert str(err.value).startswith(f"data.caption_extension: {bad!r} is not allowed") and "\n" not in str(err.value)


def test_zero_repeats_is_an_error_naming_the_folder(tmp_path):
    _image(tmp_path / "0_x" / "a.png", (1, 2, 3))
    with pytest.raises(ValueError, match=r"^data.path: 0_x/ is not allowed; a repeat folder is <repeats>_<name>"):
        scan_folder(tmp_path, SkipLog(verbose=False))


def test_each_image_appears_its_repeat_count_per_epoch_and_held_out_never(tmp_path):
    colours = {"top0": (250, 10, 10), "top1": (10, 250, 10), "a": (10, 10, 250), "b": (250, 250, 10),
               "c": (10, 250, 250), "d": (250, 10, 250), "e": (128, 128, 128), "f": (60, 60, 60)}  # fmt: skip
    _image(tmp_path / "top0.png", colours["top0"], "top zero")
    _image(tmp_path / "top1.png", colours["top1"], "top one")
    for stem in "abc":
        _image(tmp_path / "4_style" / f"{stem}.png", colours[stem], f"style {stem}", ext=".caption")
    for stem in "def":
        _image(tmp_path / "2_more" / f"{stem}.png", colours[stem], f"more {stem}", ext=".caption")
    dm = FolderDataModule(
        str(tmp_path), encoder=FakeEncoder(), resolution=64, batch_size=1, shuffle=True, template="filewords",
        cache_dir=None, val_count=2, caption_extension=".caption", seed=0,
    )  # fmt: skip
    dm.setup("fit")
    held = {h.caption for h in dm.held_out}
    # top-level images have no .caption: their captions come from the file name
    expected = {"top0": 1, "top1": 1, "style a": 4, "style b": 4, "style c": 4, "more d": 2, "more e": 2, "more f": 2}
    assert len(held) == 2 and held <= set(expected)
    seen = Counter(caption for batch in dm.stream for caption in batch["caption"])
    assert seen == {caption: n for caption, n in expected.items() if caption not in held}
