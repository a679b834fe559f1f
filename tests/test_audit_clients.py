"""hyperlit.files.comfyui and hyperlit.files.clients, the parts the verdict tests leave open: a linear file, the
exact reasons a user reads (Dropout alone, a layer list that differs), the layers ComfyUI builds from a state dict
that is not a chain of Linears, and the file names each client tag gives.

Expected layer lists are written out by hand from ComfyUI's loader rule (module docstring of
hyperlit.files.comfyui); functions are compared with the reference loaders of helpers.a1111_reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import a1111_reference as ref
from helpers.hypernetworks import randomised

from hyperlit import files
from hyperlit.files.clients import base_name, comfyui_advice
from hyperlit.files.comfyui import (
    DROPOUT_REASON,
    ComfyUIBuild,
    ComfyUIReading,
    Layer,
    a1111_layers,
    comfyui_build,
    verdict,
)
from hyperlit.hypernetwork import HypernetworkConfig


def saved(tmp_path: Path, name: str, **config) -> Path:
    hn = randomised(HypernetworkConfig(**config), sizes=[8])
    return files.save_hypernetwork(hn, tmp_path / f"{name}.pt")


def same_function(path: Path) -> bool:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    comfy, a1111 = ref.apply_pairs(ref.comfyui_load(path), x), ref.apply_pairs(ref.a1111_load(path), x)
    return all(torch.allclose(c, a, atol=1e-6, rtol=0) for c, a in zip(comfy, a1111, strict=True))


def test_a_linear_file_is_the_same_function_in_comfyui(tmp_path):
    path = saved(tmp_path, "plain", layer_structure=[1, 2, 1], activation="linear")
    assert same_function(path)
    result = verdict(files.read_file(path))
    assert (result.same_function, result.dropout_layers, result.reason) == (True, 0, "")


def test_dropout_alone_is_reported_as_dropout_alone(tmp_path):
    """[1, 2, 1] relu with dropout after the first Linear: ComfyUI's layers are A1111's plus Dropout, nothing else."""
    path = saved(tmp_path, "drop", layer_structure=[1, 2, 1], activation="relu", dropout_structure=[0, 0.3, 0])
    result = verdict(files.read_file(path))
    assert (result.same_function, result.dropout_layers, result.reason) == (False, 2, DROPOUT_REASON)


def test_a_different_layer_list_is_named_in_full(tmp_path):
    """Layer norm, elu, activate_output false: ComfyUI's walk reaches the last Linear at position 2 of 4, not last,
    so it adds an ELU there; A1111 does not."""
    path = saved(tmp_path, "norm", layer_structure=[1, 2, 1], activation="elu", layer_norm=True, activate_output=False)
    assert not same_function(path)
    result = verdict(files.read_file(path))
    assert result.reason == (
        "ComfyUI builds Linear, ELU, LayerNorm, Linear, ELU, LayerNorm where A1111 builds Linear, ELU, LayerNorm, "
        "Linear, LayerNorm (width 8 K); with layer_norm and a non-linear activation ComfyUI adds an activation "
        "after the last Linear unless activate_output is true"
    )


def relu_reading() -> ComfyUIReading:
    return ComfyUIReading(
        "relu", is_layer_norm=False, use_dropout=False, activate_output=False, last_layer_dropout=False
    )


def test_a_key_that_is_not_a_linear_stops_the_build_with_the_layers_so_far():
    first = {"linear.0.weight": torch.ones(16, 8), "linear.0.bias": torch.ones(16)}
    no_bias = {**first, "linear.1.weight": torch.ones(8, 16)}
    assert comfyui_build(no_bias, relu_reading()) == ComfyUIBuild(
        (Layer("Linear", "linear.0"), Layer("ReLU")), "linear.1.weight is read as a Linear but is not one"
    )
    # a LayerNorm's 1-D weight (with its bias) in a file whose is_layer_norm is false
    norm = {**first, "linear.1.weight": torch.ones(16), "linear.1.bias": torch.ones(16)}
    assert comfyui_build(norm, relu_reading()) == ComfyUIBuild(
        (Layer("Linear", "linear.0"), Layer("ReLU")), "linear.1.weight is read as a Linear but is not one"
    )
    chain = {**first, "linear.1.weight": torch.ones(8, 16), "linear.1.bias": torch.ones(8)}
    assert comfyui_build(chain, relu_reading()) == ComfyUIBuild((Layer("Linear", "linear.0"), Layer("ReLU"),
                                                                 Layer("Linear", "linear.1")))  # fmt: skip


@pytest.mark.parametrize(
    ("path", "name"),
    [("out/style.pt", "style"), ("style.comfyui.pt", "style"), ("a/style.hyperlit.safetensors", "style"),
     ("style.v2.pt", "style.v2"), ("comfyui.pt", "comfyui"), ("style.comfyui.hyperlit.pt", "style.comfyui")],
)  # fmt: skip
def test_base_name_drops_one_client_tag(path, name):
    assert base_name(path) == name


def test_comfyui_advice_names_the_copy_only_when_comfyui_builds_dropout():
    assert comfyui_advice("style", False) == ""
    assert comfyui_advice("style", True) == (
        "; give ComfyUI the inference copy style.comfyui.pt (written next to the final .pt, or: hyperlit convert "
        "--strip-dropout)"
    )


def linear(out: int, inp: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.ones(out, inp), "bias": torch.ones(out)}


def norm(width: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.ones(width), "bias": torch.ones(width)}


def state(*parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state dict as A1111 stores it: `linear.<index>.weight|bias` in order."""
    return {f"linear.{i}.{key}": value for i, part in enumerate(parts) for key, value in part.items()}


def test_layer_norm_files_pair_each_linear_with_the_next_key():
    """[1, 2, 2, 1] with layer norm: keys Linear, LN, Linear, LN, Linear, LN at positions 0-5; no Linear is last,
    so each gets the activation (activate_output false), and Dropout follows the first two (the third is at
    position 4 of 6: penultimate, not last_layer_dropout)."""
    reading = ComfyUIReading("relu", is_layer_norm=True, use_dropout=True, activate_output=False,
                             last_layer_dropout=False)  # fmt: skip
    built = comfyui_build(state(linear(16, 8), norm(16), linear(16, 16), norm(16), linear(8, 16), norm(8)), reading)
    assert built == ComfyUIBuild((
        Layer("Linear", "linear.0"), Layer("ReLU"), Layer("LayerNorm", "linear.1"), Layer("Dropout"),
        Layer("Linear", "linear.2"), Layer("ReLU"), Layer("LayerNorm", "linear.3"), Layer("Dropout"),
        Layer("Linear", "linear.4"), Layer("ReLU"), Layer("LayerNorm", "linear.5"),
    ))  # fmt: skip
    # the last Linear without its LayerNorm (now last of 3 keys: no activation): refused, with the layers so far
    assert comfyui_build(state(linear(16, 8), norm(16), linear(8, 16)), reading) == ComfyUIBuild(
        (Layer("Linear", "linear.0"), Layer("ReLU"), Layer("LayerNorm", "linear.1"), Layer("Dropout"),
         Layer("Linear", "linear.2")),
        "is_layer_norm is set but the last Linear has no LayerNorm",
    )  # fmt: skip


def test_an_activation_hyperlit_does_not_know_is_named_as_stored():
    reading = ComfyUIReading("softplus_x", is_layer_norm=False, use_dropout=False, activate_output=True,
                             last_layer_dropout=False)  # fmt: skip
    built = comfyui_build(state(linear(16, 8), linear(8, 16)), reading)
    assert [layer.kind for layer in built.layers] == ["Linear", "softplus_x", "Linear", "softplus_x"]


def test_the_verdicts_refusals_name_the_activation_or_the_key(tmp_path):
    path = saved(tmp_path, "gelu", layer_structure=[1, 2, 1], activation="gelu")
    result = verdict(files.read_file(path))
    assert (result.same_function, result.dropout_layers, result.reason) == (
        False, 0, "ComfyUI does not load activation 'gelu'"
    )  # fmt: skip
    # a layer-norm file whose is_layer_norm flag was cleared: ComfyUI reads the first LayerNorm (linear.2, after
    # the Linear and its activation) as a Linear
    path = saved(tmp_path, "cleared", layer_structure=[1, 2, 1], activation="relu", layer_norm=True)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    raw["is_layer_norm"] = False
    torch.save(raw, path)
    result = verdict(files.read_file(path))
    assert (result.same_function, result.dropout_layers, result.reason) == (
        False, 0, "ComfyUI cannot load it: width 8 K: linear.2.weight is read as a Linear but is not one"
    )  # fmt: skip


def test_comfyuis_defaults_for_missing_keys():
    """ComfyUI reads activation_func (default 'linear') and four flags (default false; A1111's activate_output
    default is true)."""
    assert ComfyUIReading.from_metadata({}) == ComfyUIReading("linear", False, False, False, False)
    stored = {"activation_func": "elu", "is_layer_norm": True, "use_dropout": 1, "activate_output": True,
              "last_layer_dropout": True, "dropout_structure": [0, 0, 0]}  # fmt: skip
    assert ComfyUIReading.from_metadata(stored) == ComfyUIReading("elu", True, True, True, True)


def test_a1111s_layers_leave_out_only_the_dropout(tmp_path):
    """[1, 2, 2, 1] relu with dropout after the first two Linears: A1111 (eval mode) runs every other layer."""
    path = saved(tmp_path, "a1111", layer_structure=[1, 2, 2, 1], activation="relu", dropout_structure=[0, 0.1, 0.1, 0])
    assert a1111_layers(8, files.read_file(path)) == (
        Layer("Linear", "linear.0"), Layer("ReLU"), Layer("Linear", "linear.3"), Layer("ReLU"),
        Layer("Linear", "linear.6"),
    )  # fmt: skip


def reordered(content):
    """The content with its first K module's Linears (each with the LayerNorm after it) stored in the opposite
    order: ComfyUI's walk still sees Linear, LayerNorm, ..., from other keys."""
    width, (k, v) = next(iter(content.layers.items()))
    names = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in k))
    groups: list[list[str]] = []
    for name in names:  # a Linear (2-D weight) starts a group
        if k[f"{name}.weight"].dim() == 2:
            groups.append([])
        groups[-1].append(name)
    order = [name for group in reversed(groups) for name in group]
    content.layers[width] = ({f"{n}.{leaf}": k[f"{n}.{leaf}"] for n in order for leaf in ("weight", "bias")}, v)
    return content


def test_the_same_layers_read_from_other_keys_are_named_as_such(tmp_path):
    """A linear file (no activation layers) with layer norm: ComfyUI's kinds are A1111's; stored in another order,
    its weights come from other keys. Neither extra reason applies: the activation is linear, the key is there."""
    path = saved(tmp_path, "keys", layer_structure=[1, 2, 1], activation="linear", layer_norm=True)
    assert verdict(files.read_file(path)).reason == ""
    result = verdict(reordered(files.read_file(path)))
    assert (result.same_function, result.reason) == (
        False,
        "ComfyUI reads width 8 K weights from other keys than A1111",
    )
    # content built in memory (no stored metadata) holds activate_output: no missing-key reason either
    in_memory = files.to_file_content(randomised(HypernetworkConfig(layer_structure=[1, 2, 1], activation="linear",
                                                                    layer_norm=True), sizes=[8]))  # fmt: skip
    assert in_memory.metadata is None
    assert verdict(reordered(in_memory)).reason == "ComfyUI reads width 8 K weights from other keys than A1111"


def test_a_broken_v_module_is_named(tmp_path):
    content = files.read_file(saved(tmp_path, "v", layer_structure=[1, 2, 1], activation="relu"))
    width, (k, v) = next(iter(content.layers.items()))
    content.layers[width] = (k, {key: value for key, value in v.items() if key != "linear.0.bias"})
    result = verdict(content)
    assert (result.same_function, result.dropout_layers, result.reason) == (
        False, 0, "ComfyUI cannot load it: width 8 V: linear.0.weight is read as a Linear but is not one"
    )  # fmt: skip


def test_a_missing_activate_output_key_is_a_reason_only_where_it_changes_the_layers(tmp_path):
    for activation, reason in (
        ("linear", ""),  # no activation to add after the last Linear: nothing differs
        ("relu", "ComfyUI builds Linear, ReLU, Linear where A1111 builds Linear, ReLU, Linear, ReLU (width 8 K); "
                 "the file has no activate_output key: A1111 assumes true, ComfyUI false"),
    ):  # fmt: skip
        path = saved(tmp_path, activation, layer_structure=[1, 2, 1], activation=activation, activate_output=True)
        raw = torch.load(path, map_location="cpu", weights_only=True)
        del raw["activate_output"]
        torch.save(raw, path)
        assert verdict(files.read_file(path)).reason == reason
