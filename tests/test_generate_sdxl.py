"""`hyperlit generate` on an SDXL-family model: the tiny SDXL-shaped folder (two text encoders, time_ids) through
the same command a user runs with `--model sdxl --model-path /m/sd_xl_base_1.0.safetensors`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_sdxl import write_folder
from PIL import Image

from hyperlit import cli, files
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import FAMILIES

FAMILY = FAMILIES["tiny_sdxl"]
WIDTHS = [*FAMILY.attention_widths, FAMILY.context_dim]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="module")
def hn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A network with weights large enough to change an 8-bit image, at the tiny SDXL's widths."""
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu"), sizes=WIDTHS, name="xl")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    directory = tmp_path_factory.mktemp("hn")
    files.save_hypernetwork(hn, directory / "xl.pt")
    return directory


def generate(folder: Path, hn_dir: Path, out: Path, prompt: str) -> list[Path]:
    cli.main(["generate", prompt, "--model", "tiny_sdxl", "--model-path", str(folder), "--hypernetwork-dir",
              str(hn_dir), "--out", str(out), "--steps", "2", "--n", "1", "--seed", "7"])  # fmt: skip
    return sorted(out.glob("*.png"))


def test_sdxl_generate_writes_pngs_with_a1111_infotext_and_applies_the_network(sdxl_folder, hn_dir, tmp_path):
    (plain,) = generate(sdxl_folder, hn_dir, tmp_path / "0", "a red circle <hypernet:xl:0>")
    (styled,) = generate(sdxl_folder, hn_dir, tmp_path / "1", "a red circle <hypernet:xl:1>")
    native = FAMILY.native_resolution(FAMILY.prediction_type)
    for path in (plain, styled):
        image = Image.open(path)
        assert image.size == (native, native)
        lines = image.text["parameters"].split("\n")
        assert lines[0].startswith("a red circle <hypernet:xl:")
        assert f"Size: {native}x{native}" in lines[-1] and "Seed: 7" in lines[-1]
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (plain, styled))
    assert np.abs(a - b).mean() > 1.0  # the network changes the SDXL UNet's output


def test_sdxl_widths_are_checked_by_generate(sdxl_folder, tmp_path, capsys):
    """`--model sdxl` on a folder that is not SDXL-sized is one line naming the family to use, as training's door."""
    code = cli.main(["generate", "p", "--model", "sdxl", "--model-path", str(sdxl_folder), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.family=sdxl expects 2048" in err[0]
