"""Preview grids: prompts x multipliers from one seed; multiplier 0 is the model without the hypernetwork."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.preview_task import strong_hypernetwork_task
from PIL import Image, ImageFont

from hyperlit.attention import hypernetworks_attached
from hyperlit.callbacks import preview as preview_module
from hyperlit.callbacks.grid import label_grid, layout_for, wrap
from hyperlit.callbacks.preview import PreviewImages, grid_caption
from hyperlit.runner import build_run, fit
from hyperlit.sampling import make_pipeline, sample_image


@pytest.fixture(scope="module")
def module():
    return strong_hypernetwork_task()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_grid_cells_multiplier_zero_is_no_hypernetwork(module, tmp_path: Path) -> None:
    preview = PreviewImages(str(tmp_path), prompts=["a red circle", "a blue square"], multipliers=[0, 0.5, 1], steps=2)
    cells = preview.render(module, preview.prompts)
    assert [len(row) for row in cells] == [3, 3] and cells[0][0].size == (64, 64)  # the tiny model's native size
    components = module.components
    pipe = make_pipeline(components, "dpmpp_2m")
    settings = preview.settings(module)
    for row, prompt in zip(cells, preview.prompts, strict=True):
        with hypernetworks_attached(components.unet, []):
            plain = sample_image(pipe, components, prompt, "", 0, settings)
        assert np.array_equal(pixels(row[0]), pixels(plain))
        assert not np.array_equal(pixels(row[1]), pixels(row[0]))
        assert not np.array_equal(pixels(row[2]), pixels(row[1]))
    assert module.hypernetwork.multiplier == 1.0 and module.hypernetwork.training  # restored


def test_grid_file_is_written_atomically_with_a_caption(module, tmp_path: Path, monkeypatch) -> None:
    preview = PreviewImages(str(tmp_path / "images"), prompts=["a green star"], multipliers=[0, 1], steps=1)
    trainer = SimpleNamespace(global_step=7, max_steps=10, loggers=[], datamodule=None, callbacks=[])
    preview._preview(trainer, module)
    grid = Image.open(tmp_path / "images" / "hn-7.png")
    layout = layout_for(64)
    assert grid.size == (layout.left + 128, layout.top + 64)  # two 64 px cells and the label strips
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["hn-7.png"]
    assert grid_caption(["a", "b"], [0, 0.5, 1]) == "rows (prompts) 1: a | 2: b; columns: multiplier 0, 0.5, 1"

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    trainer.global_step = 8
    with pytest.raises(OSError):
        preview._preview(trainer, module)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["hn-7.png"]  # nothing half-written left


def test_default_prompts_are_the_held_out_captions(tmp_path: Path) -> None:
    preview = PreviewImages(str(tmp_path))
    held = [SimpleNamespace(caption="a red circle"), SimpleNamespace(caption="a blue square")]
    assert preview.grid_prompts(SimpleNamespace(datamodule=SimpleNamespace(held_out=held))) == [
        "a red circle", "a blue square"]  # fmt: skip
    preview._first_caption = "first caption"
    assert preview.grid_prompts(SimpleNamespace(datamodule=SimpleNamespace(held_out=[]))) == ["first caption"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"multipliers": []}, "callbacks.preview.multipliers"),
        ({"prompts": "one prompt"}, "callbacks.preview.prompts"),
        ({"sampler": "plms"}, "callbacks.preview.sampler"),
        ({"resolution": 100}, "callbacks.preview.resolution"),
    ],
)
def test_bad_options_name_the_key(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreviewImages(str(tmp_path), **kwargs)


def ink(image: Image.Image) -> int:
    """How many pixels are dark (text on the white label strips)."""
    return int((pixels(image).min(axis=2) < 128).sum())


def test_labelled_grid_holds_the_unlabelled_cells_bit_for_bit(module, tmp_path: Path) -> None:
    prompts = ["a red circle on a white background", "a blue square"]
    trainer = SimpleNamespace(global_step=3, max_steps=10, loggers=[], datamodule=None, callbacks=[])
    for labels in (True, False):
        preview = PreviewImages(str(tmp_path / str(labels)), prompts=prompts, steps=2, labels=labels)
        preview._preview(trainer, module)
    labelled = Image.open(tmp_path / "True" / "hn-3.png").convert("RGB")
    bare = Image.open(tmp_path / "False" / "hn-3.png").convert("RGB")
    layout = layout_for(64)
    assert bare.size == (3 * 64, 2 * 64) and labelled.size == (layout.left + 3 * 64, layout.top + 2 * 64)
    cells = labelled.crop((layout.left, layout.top, labelled.width, labelled.height))
    assert np.array_equal(pixels(cells), pixels(bare))  # the cells are exactly today's grid
    # the strips: text left of every row and above every column, nothing else drawn on them
    for r in range(2):
        assert ink(labelled.crop((0, layout.top + r * 64, layout.left, layout.top + (r + 1) * 64))) > 20
    for c in range(3):
        assert ink(labelled.crop((layout.left + c * 64, 0, layout.left + (c + 1) * 64, layout.top))) > 5
    # the labels say what the rows and columns are: other prompts or multipliers draw other strips
    cells_list = [[cells.crop((c * 64, r * 64, (c + 1) * 64, (r + 1) * 64)) for c in range(3)] for r in range(2)]
    same = label_grid(cells_list, prompts, [0, 0.5, 1])
    assert np.array_equal(pixels(same), pixels(labelled))
    other_rows = label_grid(cells_list, ["a green star", "a blue square"], [0, 0.5, 1])
    other_columns = label_grid(cells_list, prompts, [0, 0.75, 1])
    row_strip = (0, layout.top, layout.left, layout.top + 64)
    column_strip = (layout.left + 64, 0, layout.left + 128, layout.top)
    assert not np.array_equal(pixels(other_rows.crop(row_strip)), pixels(labelled.crop(row_strip)))
    assert not np.array_equal(pixels(other_columns.crop(column_strip)), pixels(labelled.crop(column_strip)))


def test_long_prompts_wrap_inside_the_strip_and_are_cut_with_dots() -> None:
    font = ImageFont.load_default(size=10)
    lines = wrap("a red circle on a white background with many more words than fit in three lines", font, 120, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 120 for line in lines)
    assert wrap("a blue square", font, 120, 3) == ["a blue square"]


def test_a_run_draws_a_step_zero_grid_with_the_users_prompts(train_cfg, tmp_path: Path, monkeypatch) -> None:
    seen: list[str] = []

    def spy(pipe, components, prompt, *args):
        seen.append(prompt)
        return sample_image(pipe, components, prompt, *args)

    monkeypatch.setattr(preview_module, "sample_image", spy)
    cfg = train_cfg(
        "callbacks.preview.every=2", "callbacks.preview.prompts=['a green star','a red circle']", "logger=none",
        steps=2,
    )  # fmt: skip
    built = build_run(cfg)
    fit(built, cfg)
    images = tmp_path / "run" / "images"
    assert sorted(p.name for p in images.glob("*.png")) == ["swish_121-0.png", "swish_121-2.png"]
    # two grids x two prompts x three multipliers, every cell from the user's prompts
    assert sorted(seen) == sorted(["a green star", "a red circle"] * 6)
    layout = layout_for(64)
    assert Image.open(images / "swish_121-0.png").size == (layout.left + 3 * 64, layout.top + 2 * 64)
    preview = next(cb for cb in built.trainer.callbacks if isinstance(cb, PreviewImages))
    assert sorted(preview.changes) == [0, 2]
