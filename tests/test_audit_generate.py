"""`hyperlit generate`'s remaining user-visible details, word for word: the messages for a tag without a usable
folder, A1111's quoting of non-ASCII values, and which model `generate` loads for the options given (the model
loader and the renderer replaced by recorders: no weights)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hyperlit import generate as gen
from hyperlit.models import FAMILIES
from hyperlit.sampling import SampleSettings


def test_a_tag_without_a_folder_names_the_option_the_tag_and_what_the_folder_holds(tmp_path: Path) -> None:
    options = gen.GenerateOptions(prompt="a <hypernet:ink:0.5> <hypernet:oil>", out=tmp_path / "out")
    with pytest.raises(ValueError) as err:
        gen.plan(options)
    assert str(err.value) == (
        "--hypernetwork-dir is not set, but the prompt asks for <hypernet:ink>; set it to the folder holding the "
        "hypernetwork files"
    )


def test_an_empty_folder_says_it_found_none(tmp_path: Path) -> None:
    options = gen.GenerateOptions(prompt="<hypernet:ink>", out=tmp_path / "out", hypernetwork_dir=tmp_path)
    with pytest.raises(ValueError) as err:
        gen.plan(options)
    assert str(err.value) == f"<hypernet:ink>: no ink.pt or ink.safetensors in {tmp_path}; found: none"


@pytest.mark.parametrize(
    ("model_name", "written"),
    [
        ("modèle, v2", 'Model: "modèle, v2"'),  # A1111 writes JSON without ASCII escapes
        ("SDXL base", "Model: SDXL base"),  # nothing to quote
        ("日本: v1", 'Model: "日本: v1"'),
    ],
)
def test_values_are_quoted_as_a1111_writes_them(model_name: str, written: str) -> None:
    settings = SampleSettings(steps=2, guidance_scale=7.0, sampler="euler_a", height=64, width=64)
    components = SimpleNamespace(checkpoint_hash="0123abcd", checkpoint_name=model_name)
    last = gen.infotext("p", "", settings, 1, components).split("\n")[-1]
    assert last.endswith(f", Model hash: 0123abcd, {written}")


def test_generate_loads_the_model_the_options_name_on_the_best_device(tmp_path: Path, monkeypatch) -> None:
    options = gen.GenerateOptions(
        prompt="a", out=tmp_path / "out", model="sd15", model_path="/models/base.safetensors",
        tokenizer_path="/models/tokenizer",
    )  # fmt: skip
    the_plan = object()
    loaded, moved, ran = [], [], []

    class Components:
        def to(self, device):
            moved.append(device)
            return self

    components = Components()
    monkeypatch.setattr(gen, "plan", lambda o: the_plan if o is options else None)
    monkeypatch.setattr(gen, "load_components", lambda **kw: loaded.append(kw) or components)
    monkeypatch.setattr(gen, "run", lambda p, c: ran.append((p, c)) or [tmp_path / "out" / "0-0.png"])
    assert gen.generate(options) == [tmp_path / "out" / "0-0.png"]
    assert loaded == [{"family": "sd15", "path": "/models/base.safetensors", "tokenizer_path": "/models/tokenizer"}]
    assert moved == ["cuda" if torch.cuda.is_available() else "cpu"]
    assert ran == [(the_plan, components)]


def test_plan_sizes_and_their_messages(tmp_path: Path) -> None:
    settings = gen.plan(gen.GenerateOptions(prompt="a", out=tmp_path, height=48, width=96)).settings
    assert (settings.height, settings.width) == (48, 96)
    native = FAMILIES["tiny"].native_resolution()
    settings = gen.plan(gen.GenerateOptions(prompt="a", out=tmp_path)).settings
    assert (settings.height, settings.width) == (native, native)
    for key in ("height", "width"):
        with pytest.raises(ValueError) as err:
            gen.plan(gen.GenerateOptions(prompt="a", out=tmp_path, **{key: 60}))
        assert str(err.value) == f"--{key}: 60 is not allowed; use a positive multiple of 8"


def test_plan_checks_the_model_path_given(tmp_path: Path) -> None:
    missing = tmp_path / "base.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        gen.plan(gen.GenerateOptions(prompt="a", out=tmp_path, model="sd15", model_path=str(missing)))
    assert str(err.value).startswith(f"model.path={missing} does not exist")


def test_other_tags_are_named_in_a_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="hyperlit.generate"):
        the_plan = gen.plan(gen.GenerateOptions(prompt="a <lyco:x:1> b", out=tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        "skipping <lyco:x:1>: hyperlit applies only <hypernet:...> and <lora:...> tags"
    ]
    assert the_plan.parsed.text == "a b" and the_plan.hypernetworks == [] and the_plan.loras == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "--seed: -1 is not allowed; use an integer >= 0"),
        ({"steps": 0}, "--steps: 0 is not allowed; use an integer >= 1"),
        ({"n": True}, "--n: True is not allowed; use an integer >= 1"),
        ({"seed": 1.5}, "--seed: 1.5 is not allowed; use an integer >= 0"),
        ({"cfg": -0.5}, "--cfg: -0.5 is not allowed; use a finite number >= 0"),
        ({"cfg": float("inf")}, "--cfg: inf is not allowed; use a finite number >= 0"),
    ],
)
def test_option_messages(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        gen.GenerateOptions(prompt="a", out=tmp_path, **kwargs)
    assert str(err.value) == message


def test_options_accept_their_edges_and_make_paths(tmp_path: Path) -> None:
    options = gen.GenerateOptions(
        prompt="a", out=str(tmp_path), seed=0, steps=1, n=1, cfg=0.0, lora_dir=str(tmp_path / "l"),
        hypernetwork_dir=str(tmp_path / "h"),
    )  # fmt: skip
    assert (options.out, options.lora_dir, options.hypernetwork_dir) == (tmp_path, tmp_path / "l", tmp_path / "h")
    assert gen.GenerateOptions(prompt="a", out=tmp_path, cfg=0.5).cfg == 0.5
