"""`hyperlit generate`'s choices that a user sees in A1111, each checked against an oracle written here.

Round two of "tests that catch": which file a `<hypernet:NAME>` tag loads, the infotext A1111 parses back from the
PNG, and its `Size:` field (A1111 writes width x height).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hyperlit import files
from hyperlit import generate as gen
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import FAMILIES
from hyperlit.sampling import SampleSettings

TINY_WIDTHS = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]
# A1111's infotext grammar (modules/infotext_utils.py, as a fact): `key: value` pairs split by this pattern, a value
# that starts with a quote is JSON. Written here from that grammar, not from our writer.
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_pairs(last_line: str) -> dict[str, str]:
    pairs = {}
    for key, value in A1111_PAIR.findall(last_line):
        pairs[key.strip()] = json.loads(value) if value.startswith('"') else value
    return pairs


def network(name: str, scale: float) -> Hypernetwork:
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1]), sizes=TINY_WIDTHS, name=name)
    with torch.no_grad():
        for p in hn.parameters():
            p.fill_(scale)
    return hn


def test_a_name_with_both_files_loads_the_pt(tmp_path: Path) -> None:
    """A1111's own format wins: the tag loads NAME.pt, whose weights differ from NAME.safetensors'."""
    files.save_hypernetwork(network("style", 0.25), tmp_path / "style.pt")
    files.save_hypernetwork(network("style", 0.75), tmp_path / "style.safetensors")
    files.save_hypernetwork(network("other", 0.5), tmp_path / "other.safetensors")
    found = gen.available_hypernetworks(tmp_path)
    assert found == {"other": tmp_path / "other.safetensors", "style": tmp_path / "style.pt"}
    options = gen.GenerateOptions(
        prompt="a red circle <hypernet:style:0.5>", out=tmp_path / "out", hypernetwork_dir=tmp_path
    )
    (loaded,) = gen.plan(options).hypernetworks  # checks the model config only: no weights load
    assert all(float(p.detach().flatten()[0]) == 0.25 for p in loaded.parameters())
    assert loaded.multiplier == 0.5


def components(name: str) -> SimpleNamespace:
    return SimpleNamespace(checkpoint_hash="0123abcd", checkpoint_name=name)


@pytest.mark.parametrize("model_name", ["plain", "dir:with:colons", "a, b", "line\nbreak"])
def test_infotext_values_survive_a1111s_parser(model_name: str) -> None:
    settings = SampleSettings(steps=7, guidance_scale=6.5, sampler="euler_a", height=64, width=64)
    text = gen.infotext("a red circle <hypernet:x:1>", "", settings, 1234, components(model_name))
    assert text.count("\n") == 1  # prompt, then the pairs (a newline inside a value is quoted away)
    pairs = a1111_pairs(text.split("\n")[-1])
    assert pairs["Model"] == model_name
    assert (pairs["Steps"], pairs["Seed"], pairs["CFG scale"], pairs["Model hash"]) == ("7", "1234", "6.5", "0123abcd")


def a1111_quote(text: str) -> str:
    """A1111's writer rule (a fact of its infotext): JSON-quote a value holding ',', ':' or a newline."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


@pytest.mark.parametrize("model_name", ["plain", "C:/models/sd15", "dir:with:colons", "a, b"])
def test_infotext_is_the_line_a1111_writes(model_name: str) -> None:
    """Byte-equal to the line A1111 writes for the same settings, so its own parser reads what it always reads."""
    settings = SampleSettings(steps=20, guidance_scale=7.0, sampler="euler_a", height=64, width=96)
    text = gen.infotext("p", "", settings, 5, components(model_name))
    expected = (
        f"Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 96x64, Model hash: 0123abcd, "
        f"Model: {a1111_quote(model_name)}"
    )
    assert text.split("\n")[-1] == expected


def test_size_is_width_by_height_for_a_non_square_image() -> None:
    settings = SampleSettings(steps=2, guidance_scale=7.0, sampler="euler_a", height=48, width=96)
    text = gen.infotext("p", "", settings, 0, components("m"))
    assert a1111_pairs(text.split("\n")[-1])["Size"] == "96x48"  # A1111: f"{width}x{height}"
