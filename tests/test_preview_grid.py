"""Preview grids: prompts x multipliers from one seed; multiplier 0 is the model without the hypernetwork."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hyperlit.attention import attach_hypernetworks, hypernetworks_attached
from hyperlit.callbacks.preview import PreviewImages, grid_caption
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import FAMILIES, load_components
from hyperlit.sampling import make_pipeline, sample_image
from hyperlit.tasks.hypernetwork.module import HypernetworkTask

TINY_WIDTHS = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]


@pytest.fixture(scope="module")
def module():
    components = load_components(family="tiny")
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu"), sizes=TINY_WIDTHS, name="hn")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    attach_hypernetworks(components.unet, [hn])
    return HypernetworkTask(hypernetwork=hn, components=components, optimizer=partial(torch.optim.AdamW))


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
    trainer = SimpleNamespace(global_step=7, loggers=[], datamodule=None, callbacks=[])
    preview._preview(trainer, module)
    grid = Image.open(tmp_path / "images" / "hn-7.png")
    assert grid.size == (128, 64)
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
