"""`hyperlit generate` on the tiny model: A1111 tags pick the networks, PNGs carry A1111's parameters chunk."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.infotext import parse_parameters
from PIL import Image

from hyperlit import cli, files
from hyperlit import generate as gen
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import FAMILIES, load_components

TINY_WIDTHS = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]


def strong_network(name: str, seed: int) -> Hypernetwork:
    """A tiny-model network with weights large enough to change an 8-bit image (fresh ones are near identity)."""
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu"), sizes=TINY_WIDTHS, name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return hn


@pytest.fixture(scope="module")
def hn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hypernetworks")
    files.save_hypernetwork(strong_network("style_a", 1), directory / "style_a.pt")
    files.save_hypernetwork(strong_network("style_b", 2), directory / "style_b.safetensors")
    return directory


@pytest.fixture(scope="module")
def tiny():
    return load_components(family="tiny")


def render(tiny, hn_dir: Path, out: Path, prompt: str, **kw) -> list[np.ndarray]:
    options = gen.GenerateOptions(prompt=prompt, out=out, hypernetwork_dir=hn_dir, steps=2, n=kw.pop("n", 1), **kw)
    paths = gen.run(gen.plan(options), tiny)
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_cli_end_to_end_writes_pngs_with_a1111_parameters(
    tiny, hn_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    prompt = "a blue square <hypernet:style_a:0.8>"
    argv = [
        "generate",
        prompt,
        "--hypernetwork-dir",
        str(hn_dir),
        "--out",
        str(out),
        "--seed",
        "3",
        "--n",
        "2",
        "--steps",
        "2",
        "--cfg",
        "7",
        "--negative-prompt",
        "blurry, red",
        "--sampler",
        "dpmpp_2m",
    ]
    assert cli.main(argv) == 0
    assert "wrote 2 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["3-0.png", "4-1.png"]  # no temporary files left
    for index, seed in enumerate((3, 4)):
        image = Image.open(out / f"{seed}-{index}.png")
        assert image.size == (64, 64)  # the tiny model's native size
        text, negative, pairs = parse_parameters(image.info["parameters"])
        assert text == prompt  # A1111 keeps the tags in the infotext, so the image can be made again
        assert negative == "blurry, red"
        assert pairs == {
            "Steps": "2",
            "Sampler": "DPM++ 2M",
            "CFG scale": "7",
            "Seed": str(seed),
            "Size": "64x64",
            "Model hash": tiny.checkpoint_hash,
            "Model": "tiny",
        }
        assert re.fullmatch(r"[0-9a-f]{10}", pairs["Model hash"])


def test_no_negative_prompt_line_when_empty(tiny, hn_dir: Path, tmp_path: Path) -> None:
    render(tiny, hn_dir, tmp_path, "a cat", cfg=5.5)
    lines = Image.open(tmp_path / "0-0.png").info["parameters"].split("\n")
    assert lines[0] == "a cat" and len(lines) == 2
    assert lines[1].startswith("Steps: 2, Sampler: Euler a, CFG scale: 5.5, Seed: 0, Size: 64x64, Model hash: ")


def test_image_i_uses_seed_plus_i(tiny, hn_dir: Path, tmp_path: Path) -> None:
    batch = render(tiny, hn_dir, tmp_path / "a", "a red circle <hypernet:style_a>", seed=10, n=3)
    alone = render(tiny, hn_dir, tmp_path / "b", "a red circle <hypernet:style_a>", seed=12)
    assert np.array_equal(batch[2], alone[0])
    assert not np.array_equal(batch[0], batch[1])


def test_multiplier_zero_is_no_hypernetwork(tiny, hn_dir: Path, tmp_path: Path) -> None:
    plain = render(tiny, hn_dir, tmp_path / "plain", "a green star")[0]
    zero = render(tiny, hn_dir, tmp_path / "zero", "a green star <hypernet:style_a:0>")[0]
    one = render(tiny, hn_dir, tmp_path / "one", "a green star <hypernet:style_a:1>")[0]
    assert np.array_equal(zero, plain)
    assert not np.array_equal(one, plain)  # the network does act, so the equality above means something


def test_networks_stack_in_order_with_their_own_multipliers(tiny, hn_dir: Path, tmp_path: Path) -> None:
    the_plan = gen.plan(
        gen.GenerateOptions(prompt="x <hypernet:style_b:0.5> <hypernet:style_a>", out=tmp_path, hypernetwork_dir=hn_dir)
    )
    assert [(hn.name, hn.multiplier, hn.training) for hn in the_plan.hypernetworks] == [
        ("style_b", 0.5, False),
        ("style_a", 1.0, False),
    ]
    a_then_b = render(tiny, hn_dir, tmp_path / "ab", "x <hypernet:style_a> <hypernet:style_b>")[0]
    b_then_a = render(tiny, hn_dir, tmp_path / "ba", "x <hypernet:style_b> <hypernet:style_a>")[0]
    assert not np.array_equal(a_then_b, b_then_a)
    # a network at 0 in the stack drops out exactly, whatever its place
    b_only = render(tiny, hn_dir, tmp_path / "b", "x <hypernet:style_b>")[0]
    zero_a = render(tiny, hn_dir, tmp_path / "0ab", "x <hypernet:style_a:0> <hypernet:style_b>")[0]
    assert np.array_equal(zero_a, b_only)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(gen, "load_components", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a <hypernet:nope:0.8>"], "<hypernet:nope>: no nope.pt or nope.safetensors in .*; found: style_a, style_b"),
        (["a <hypernet:style_a:lots>"], "multiplier 'lots' is not a number"),
        (["a", "--sampler", "plms"], "--sampler: 'plms' is not allowed; allowed: euler_a, euler, dpmpp_2m, ddim"),
        (["a", "--width", "60"], "--width: 60 is not allowed; use a positive multiple of 8"),
        (["a", "--n", "0"], "--n: 0 is not allowed"),
        (["a", "--model", "sd15"], "model.family=sd15 needs model.path"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_the_model_loads(
    hn_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: None,
    args: list[str],
    message: str,
) -> None:
    argv = ["generate", *args, "--hypernetwork-dir", str(hn_dir), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperlit generate: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_network_for_another_model_is_refused(tmp_path: Path, no_model_load: None) -> None:
    hn = Hypernetwork(HypernetworkConfig(), sizes=[320, 640, 768], name="sd1_style")
    files.save_hypernetwork(hn, tmp_path / "sd1_style.pt")
    options = gen.GenerateOptions(prompt="<hypernet:sd1_style>", out=tmp_path / "o", hypernetwork_dir=tmp_path)
    with pytest.raises(ValueError, match=r"widths \[320, 640, 768\], but model tiny has attention widths"):
        gen.plan(options)


def test_tag_without_directory_is_refused(tmp_path: Path) -> None:
    options = replace(gen.GenerateOptions(prompt="a", out=tmp_path), prompt="<hypernet:x>")
    with pytest.raises(ValueError, match="--hypernetwork-dir is not set"):
        gen.plan(options)
