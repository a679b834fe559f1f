"""`hyperlit inspect`'s ComfyUI verdict, and the `.comfyui.pt` copy, follow ComfyUI's loader rule exactly.

The rule, as the test states it (spec a1111-hypernetwork.md section 6, ComfyUI's comfy_extras/nodes_hypernetwork.py):
ComfyUI walks each module's `*.weight` keys (LayerNorm weights included) and puts Dropout(0.3) after the Linear at
list position i when `use_dropout`, i is not the last position, and i is not the penultimate one unless
`last_layer_dropout` (default false); it never reads `dropout_structure`. The verdict is checked over every
combination of structure length 3/4/5 (integer and non-integer widths), layer norm, use_dropout,
last_layer_dropout and activate_output, against that rule and against the functions the reference loaders of
`helpers.a1111_reference` compute.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import a1111_reference as ref
from helpers.hypernetworks import randomised
from torch import nn

from hyperlit import cli, files
from hyperlit.callbacks.export import HypernetworkExport
from hyperlit.files.a1111 import derive_dropout_structure
from hyperlit.hypernetwork import HypernetworkConfig

STRUCTURES = [
    [1, 2, 1],
    [1, 1.5, 1],
    [1, 2, 2, 1],
    [1, 1.5, 0.75, 1],
    [1, 2, 4, 2, 1],
    [1, 1.5, 2.5, 0.75, 1],
]
FLAGS = list(itertools.product([False, True], repeat=4))  # layer_norm, use_dropout, last_layer_dropout, activate_output
WIDTHS = [8, 12]


def rule_dropout_per_module(length: int, layer_norm: bool, use_dropout: bool, last_layer_dropout: bool) -> int:
    """The rule, by hand: Linear positions in the weight-key list, Dropout after those neither last nor
    (without last_layer_dropout) penultimate."""
    linears = length - 1
    step = 2 if layer_norm else 1
    n = linears * step
    positions = [k * step for k in range(linears)]
    if not use_dropout:
        return 0
    return sum(i != n - 1 and (i != n - 2 or last_layer_dropout) for i in positions)


def _dropout_structure(structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float] | None:
    dropout = derive_dropout_structure(structure, use_dropout, last_layer_dropout)
    return dropout if any(dropout) else None


def _write_combination(tmp_path: Path, structure, layer_norm, use_dropout, last_layer_dropout, activate_output):
    """A file whose stored flags are exactly the combination (as an A1111 nov-2022 file or an edited one holds
    them), with dropout_structure and weights as A1111 would have written them."""
    config = HypernetworkConfig(
        layer_structure=structure,
        activation="elu",
        layer_norm=layer_norm,
        activate_output=activate_output,
        dropout_structure=_dropout_structure(structure, use_dropout, last_layer_dropout),
    )
    path = files.save_hypernetwork(randomised(config, sizes=WIDTHS), tmp_path / "combo.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    raw.update(use_dropout=use_dropout, last_layer_dropout=last_layer_dropout)
    torch.save(raw, path)
    return path


def _reference_same_function(path: Path) -> tuple[bool, int]:
    """(ComfyUI computes A1111's function, Dropout layers ComfyUI builds) from the reference loaders."""
    comfy = ref.comfyui_load(path, eval_mode=True)
    dropout = sum(isinstance(m, nn.Dropout) for pair in comfy.values() for mod in pair for m in mod.modules())
    a1111 = ref.a1111_load(path)
    same = dropout == 0
    for width in WIDTHS:
        x = torch.randn(3, width, generator=torch.Generator().manual_seed(width))
        for got, want in zip(ref.apply_pairs(comfy, x), ref.apply_pairs(a1111, x), strict=True):
            same = same and got.shape == want.shape and torch.allclose(got, want, atol=1e-6, rtol=0)
    return same, dropout


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_inspect_verdict_follows_comfyuis_rule_for_every_combination(tmp_path: Path, structure) -> None:
    for layer_norm, use_dropout, last_layer_dropout, activate_output in FLAGS:
        case = f"{structure} ln={layer_norm} dropout={use_dropout} lld={last_layer_dropout} ao={activate_output}"
        path = _write_combination(tmp_path, structure, layer_norm, use_dropout, last_layer_dropout, activate_output)
        info = cli.describe(files.read_file(path), path)
        per_module = rule_dropout_per_module(len(structure), layer_norm, use_dropout, last_layer_dropout)
        same, dropout = _reference_same_function(path)
        assert dropout == per_module * 2 * len(WIDTHS), case  # the reference loader builds what the rule says
        # elu with layer norm but no activate_output: ComfyUI adds an activation after the last Linear
        assert same == (per_module == 0 and not (layer_norm and not activate_output)), case
        assert info["comfyui_same_function"] is same, case
        note = info["comfyui_note"] or ""
        assert ("Dropout(0.3)" in note) == (per_module > 0), case
        assert ("combo.comfyui.pt" in note) == (per_module > 0), case
        assert (note == "") == same, case


def test_the_issues_two_files_are_flagged(tmp_path: Path) -> None:
    """[1, 1.5, 1] elu and [1, 2, 1] mish with dropout, no layer norm: ComfyUI builds Dropout after the first Linear."""
    for structure, activation in (([1, 1.5, 1], "elu"), ([1, 2, 1], "mish")):
        config = HypernetworkConfig(layer_structure=structure, activation=activation, dropout_structure=[0, 0.3, 0])
        path = files.save_hypernetwork(randomised(config, sizes=[1024]), tmp_path / f"{activation}.pt")
        info = cli.describe(files.read_file(path), path)
        assert info["comfyui_same_function"] is False and "Dropout(0.3)" in info["comfyui_note"]
        comfy = ref.comfyui_load(path)
        x = torch.randn(2, 5, 1024)
        first, second = ref.apply_pairs(comfy, x)[0], ref.apply_pairs(comfy, x)[0]
        assert not torch.equal(first, second)  # Dropout active at every call
        copy = files.write_file(tmp_path / f"{activation}.comfyui.pt", files.strip_dropout(files.read_file(path)))
        assert cli.describe(files.read_file(copy), copy)["comfyui_same_function"] is True
        want = files.load_hypernetwork(path).forward_kv(x)
        for got, expected in zip(ref.apply_pairs(ref.comfyui_load(copy), x), want, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_missing_keys_take_comfyuis_defaults(tmp_path: Path) -> None:
    """No last_layer_dropout key: ComfyUI assumes false; no activate_output key: ComfyUI false, A1111 true."""
    config = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu")
    path = files.save_hypernetwork(randomised(config, sizes=[8]), tmp_path / "old.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    raw["use_dropout"] = True  # a nov-2022 file: A1111 derives dropout [0, 0, 0] from the two missing keys
    del raw["last_layer_dropout"], raw["dropout_structure"]
    torch.save(raw, path)
    assert cli.describe(files.read_file(path), path)["comfyui_same_function"] is True
    assert _reference_same_function_single(path)
    raw["activate_output"] = True
    torch.save(raw, path)
    assert cli.describe(files.read_file(path), path)["comfyui_same_function"] is True
    del raw["activate_output"]  # oct-2022: A1111 applies relu after the last Linear, ComfyUI does not
    torch.save(raw, path)
    info = cli.describe(files.read_file(path), path)
    assert info["comfyui_same_function"] is False and "no activate_output key" in info["comfyui_note"]
    assert not _reference_same_function_single(path)


def _reference_same_function_single(path: Path) -> bool:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    comfy, a1111 = ref.apply_pairs(ref.comfyui_load(path), x), ref.apply_pairs(ref.a1111_load(path), x)
    return all(torch.allclose(c, a, atol=1e-6, rtol=0) for c, a in zip(comfy, a1111, strict=True))


def _final_export(tmp_path: Path, config: HypernetworkConfig) -> Path:
    """Run the export callback's end-of-training write with a stand-in trainer and module."""
    hn = randomised(config, sizes=WIDTHS, name="style")
    trainer = SimpleNamespace(is_global_zero=True, global_step=3, optimizers=[], callbacks=[], loggers=[])
    module = SimpleNamespace(
        hypernetwork=hn, initial_step=0, components=SimpleNamespace(checkpoint_hash=None, checkpoint_name=None)
    )
    HypernetworkExport(str(tmp_path), log_artifact=False).save_final(trainer, module)
    return tmp_path


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_comfyui_copy_is_written_exactly_where_comfyui_builds_dropout(tmp_path: Path, structure) -> None:
    lengths = len(structure)
    only_last = tuple([0.0] * (lengths - 1) + [0.2])  # use_dropout true, yet ComfyUI builds no Dropout
    dropouts = {None, *(tuple(derive_dropout_structure(structure, True, lld)) for lld in (False, True)), only_last}
    for (layer_norm, activate_output), dropout in itertools.product(
        itertools.product([False, True], repeat=2), dropouts
    ):
        dropout = list(dropout) if dropout and any(dropout) else None
        config = HypernetworkConfig(
            layer_structure=structure, activation="swish", layer_norm=layer_norm, activate_output=activate_output,
            dropout_structure=dropout,
        )  # fmt: skip
        folder = _final_export(tmp_path / f"{layer_norm}-{activate_output}-{dropout}", config)
        raw = torch.load(folder / "style.pt", map_location="cpu", weights_only=True)
        per_module = rule_dropout_per_module(lengths, layer_norm, raw["use_dropout"], raw["last_layer_dropout"])
        case = f"{structure} ln={layer_norm} ao={activate_output} dropout={dropout}"
        assert (folder / "style.comfyui.pt").is_file() == (per_module > 0), case
        if per_module:
            copy = folder / "style.comfyui.pt"
            assert cli.describe(files.read_file(copy), copy)["comfyui_same_function"] is (
                not layer_norm or activate_output
            ), case
