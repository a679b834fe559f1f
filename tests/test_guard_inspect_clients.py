"""What `hyperlit inspect` tells a user about clients, without a training run: which clients read the file (by
extension, any case), and for a file ComfyUI builds Dropout layers for, the copy to give it instead."""

from __future__ import annotations

import json

import pytest

from hyperlit import cli
from hyperlit.files import read_file, save_hypernetwork, strip_dropout, write_file
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig

PT_READERS = "A1111 (models/hypernetworks, <hypernet:name:1>) and ComfyUI (HypernetworkLoader); hyperlit"
SAFETENSORS_READERS = (
    "hyperlit only: A1111 does not list .safetensors hypernetworks and ComfyUI would load it as a silent no-op "
    "(not a client file; `hyperlit convert` it to .pt for A1111 or ComfyUI)"
)
ADVICE = (
    "; give ComfyUI the inference copy style.comfyui.pt (written next to the final .pt, or: hyperlit convert "
    "--strip-dropout)"
)


def inspect(path, capsys) -> dict:
    assert cli.main(["inspect", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def network(dropout=None) -> Hypernetwork:
    return Hypernetwork(HypernetworkConfig(activation="swish", dropout_structure=dropout), sizes=[8], name="style")


@pytest.mark.parametrize(("file_name", "readers"), [("style.pt", PT_READERS), ("style.PT", PT_READERS),
                                                    ("style.hyperlit.safetensors", SAFETENSORS_READERS)])  # fmt: skip
def test_inspect_names_the_clients_that_read_the_file(tmp_path, capsys, file_name, readers):
    path = save_hypernetwork(network(), tmp_path / file_name.replace(".PT", ".pt"))
    if file_name.endswith(".PT"):
        path = path.rename(tmp_path / file_name)
    info = inspect(path, capsys)
    assert info["clients"] == readers and info["name"] == "style"


def test_a_file_comfyui_builds_dropout_for_gets_the_copys_name_and_the_copy_none(tmp_path, capsys):
    path = save_hypernetwork(network([0, 0.3, 0]), tmp_path / "style.pt")
    info = inspect(path, capsys)
    assert info["comfyui_same_function"] is False
    assert info["comfyui_note"].endswith(ADVICE) and info["comfyui_note"].count(ADVICE) == 1
    copy = write_file(tmp_path / "style.comfyui.pt", strip_dropout(read_file(path)))
    stripped = inspect(copy, capsys)
    assert (stripped["comfyui_same_function"], stripped["comfyui_note"], stripped["name"]) == (True, None, "style")


def test_no_advice_when_comfyui_differs_for_another_reason(tmp_path, capsys):
    hn = Hypernetwork(HypernetworkConfig(activation="gelu"), sizes=[8], name="style")  # not in ComfyUI's table
    info = inspect(save_hypernetwork(hn, tmp_path / "style.pt"), capsys)
    assert info["comfyui_same_function"] is False
    assert info["comfyui_note"] == "ComfyUI does not load activation 'gelu'"
