"""Audit (issue 14, mutmut survivors): hypernetwork layer construction details that change the trained weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hyperlit.hypernetwork import (
    Hypernetwork,
    HypernetworkConfig,
    HypernetworkModule,
    _parameter_free_torch_activations,
)


def test_dropout_follows_the_entry_of_the_layer_it_comes_after():
    # A1111's dropout_structure: entry i+1 applies after the Linear that produces layer i+1
    cfg = HypernetworkConfig(layer_structure=[1, 2, 2, 1], dropout_structure=[0, 0.1, 0.3, 0])
    mlp = HypernetworkModule(8, cfg)
    kinds = [(type(m).__name__, getattr(m, "p", None)) for m in mlp.modules() if isinstance(m, nn.Linear | nn.Dropout)]
    assert kinds == [("Linear", None), ("Dropout", 0.1), ("Linear", None), ("Dropout", 0.3), ("Linear", None)]


@pytest.mark.parametrize(
    ("layer_structure", "expected"),
    [([1, 2, 1], [0.0, 0.3, 0.0]), ([1, 2, 2, 1], [0.0, 0.3, 0.3, 0.0]), ([1, 4, 2, 4, 1], [0.0, 0.3, 0.3, 0.3, 0.0])],
)
def test_one_dropout_number_is_a1111s_use_dropout_layout_for_any_structure(layer_structure, expected):
    # A family default is one number; the layout: p after every hidden layer, none after the input or the output
    cfg = HypernetworkConfig(layer_structure=layer_structure, dropout_structure=0.3)
    assert cfg.dropout_structure == expected and cfg.use_dropout
    mlp = HypernetworkModule(8, cfg)
    drops = [m.p for m in mlp.modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.3] * (len(layer_structure) - 2)
    assert not HypernetworkConfig(dropout_structure=0).use_dropout


@pytest.mark.parametrize("activation", ["relu", "leakyrelu"])
def test_kaiming_init_uses_the_activations_gain(activation):
    # Kaiming normal: std = gain / sqrt(fan_in). A1111 passes nonlinearity "leaky_relu" for leakyrelu but no slope,
    # so torch uses a = 0 and the gain is sqrt(2) either way (bitwise the same draw as "relu"): which name is passed
    # is an equivalent mutant (docs/testing.md); a wrong init is not.
    gain = math.sqrt(2.0)
    torch.manual_seed(0)
    cfg = HypernetworkConfig(layer_structure=[1, 1], activation=activation, weight_init="KaimingNormal")
    mlp = HypernetworkModule(4096, cfg)
    w = next(m for m in mlp.modules() if isinstance(m, nn.Linear)).weight
    assert float(w.std()) == pytest.approx(gain / math.sqrt(4096), rel=2e-3)
    normal = next(m for m in HypernetworkModule(64, HypernetworkConfig(layer_structure=[1, 1])).modules()
                  if isinstance(m, nn.Linear))  # fmt: skip
    assert float(normal.weight.std()) == pytest.approx(0.01, rel=0.1) and float(normal.weight.mean()) == pytest.approx(
        0.0, abs=2e-3
    )


def test_structure_limits():
    HypernetworkModule(1, HypernetworkConfig(layer_structure=[1, 1]))  # a width-1 layer is allowed
    with pytest.raises(ValueError, match="width 0"):
        HypernetworkModule(1, HypernetworkConfig(layer_structure=[1, 0.5, 1]))
    assert HypernetworkConfig(layer_structure=[1, 1]).layer_structure == [1, 1]  # two entries are enough
    assert HypernetworkConfig(layer_structure=[1, 1.5, 1]).layer_structure == [1, 1.5, 1]
    assert [type(x) for x in HypernetworkConfig(layer_structure=[1.0, 2.0, 1.0]).layer_structure] == [int] * 3
    with pytest.raises(ValueError, match="hypernet.layer_structure"):
        HypernetworkConfig(layer_structure=[1, True, 1])
    with pytest.raises(ValueError, match="hypernet.dropout_structure"):
        HypernetworkConfig(layer_structure=[1, 2, 1], dropout_structure=[0, True, 0])
    with pytest.raises(ValueError, match=r"^hypernet.multiplier: True is not a number$"):
        HypernetworkConfig(multiplier=True)


def test_sizes_and_new_network_defaults():
    assert Hypernetwork(HypernetworkConfig(), sizes=[1]).sizes == [1]  # width 1 is a valid size
    hn = Hypernetwork(HypernetworkConfig(), sizes=[32])
    assert (hn.name, hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name, hn.source_layout) == (
        "hypernetwork", 0, None, None, None
    )  # fmt: skip
    with pytest.raises(ValueError, match="hypernet.sizes is 'auto'"):
        Hypernetwork(HypernetworkConfig(sizes="auto"))


def test_config_messages_name_the_key_the_value_and_what_is_allowed():
    cases = [
        (
            dict(layer_structure="1,2,1"),
            "hypernet.layer_structure: '1,2,1' is not a list; use a list of numbers that "
            "starts and ends with 1, e.g. [1, 2, 1]",
        ),
        (dict(layer_structure=[1]), "hypernet.layer_structure: [1] needs at least two entries, e.g. [1, 2, 1]"),
        (
            dict(layer_structure=[1, "2", 1]),
            "hypernet.layer_structure: entry '2' in [1, '2', 1] is not allowed; entries are numbers > 0",
        ),
        (
            dict(dropout_structure=[0, 0.1]),
            "hypernet.dropout_structure: [0, 0.1] has 2 entries; it needs 3, one per layer_structure entry",
        ),
        (
            dict(dropout_structure=[0, "0.1", 0]),
            "hypernet.dropout_structure: entry '0.1' in [0, '0.1', 0] is not allowed; entries are in [0, 1)",
        ),
        (
            dict(dropout_structure=1.0),
            "hypernet.dropout_structure: 1.0 is not allowed; a single probability is in [0, 1)",
        ),
        (
            dict(dropout_structure=-0.1),
            "hypernet.dropout_structure: -0.1 is not allowed; a single probability is in [0, 1)",
        ),
        (
            dict(dropout_structure=True),
            "hypernet.dropout_structure: True is not a list; use null, one number in [0, 1) (on every hidden layer) "
            "or 3 numbers in [0, 1)",
        ),
        (dict(multiplier="0.5"), "hypernet.multiplier: '0.5' is not a number"),
        (dict(sizes=[768, 0]), "hypernet.sizes: entry 0 is not allowed; widths are positive integers"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError) as info:
            HypernetworkConfig(**options)
        assert str(info.value) == message  # a ValueError with these words, not a TypeError from a later check


def test_sizes_auto_is_kept_and_explicit_sizes_build_the_network():
    assert HypernetworkConfig().sizes == "auto"
    assert Hypernetwork(HypernetworkConfig(sizes=[48, 32])).sizes == [48, 32]
    with pytest.raises(ValueError) as info:
        Hypernetwork(HypernetworkConfig())
    assert str(info.value) == (
        "hypernet.sizes is 'auto': resolve it against the base model (pass sizes=[...]) before building the "
        "hypernetwork"
    )


def test_layer_state_dicts_are_fp32_cpu_copies_of_each_path():
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1]), sizes=[4, 6]).to(torch.bfloat16)
    layers = hn.layer_state_dicts()
    assert sorted(layers) == [4, 6]
    for width, (k_state, v_state) in layers.items():
        k_module, v_module = hn.pairs[str(width)]
        for state, module in ((k_state, k_module), (v_state, v_module)):
            assert list(state) == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
            for key, value in state.items():
                live = module.state_dict()[key]
                assert value.dtype == torch.float32 and value.device.type == "cpu"
                assert torch.equal(value, live.float())
                assert value.data_ptr() != live.data_ptr()  # a copy: training cannot change a saved state


def _states(hn: Hypernetwork) -> dict:
    return {w: (dict(k), dict(v)) for w, (k, v) in hn.layer_state_dicts().items()}


def test_load_layer_state_dicts_round_trips_and_refuses_mismatches():
    config = HypernetworkConfig(layer_structure=[1, 2, 1])
    source = Hypernetwork(config, sizes=[4, 6])
    with torch.no_grad():
        for i, p in enumerate(source.parameters()):
            p.fill_(0.1 * (i + 1))
    target = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1]), sizes=[4, 6])
    target.load_layer_state_dicts(_states(source))
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True))

    def refused(layers: dict, source_name: str | None = None) -> str:
        fresh = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1]), sizes=[4, 6])
        with pytest.raises(ValueError) as info:
            if source_name is None:
                fresh.load_layer_state_dicts(layers)
            else:
                fresh.load_layer_state_dicts(layers, source=source_name)
        return str(info.value)

    states = _states(source)
    assert refused({4: states[4]}) == "state: widths [4] do not match the hypernetwork's widths [4, 6]"
    assert refused({**states, 8: states[4]}, "f.pt") == (
        "f.pt: widths [4, 6, 8] do not match the hypernetwork's widths [4, 6]"
    )
    prefix = (
        "state: width 6 {} module does not fit the structure [1, 2, 1] (activation linear, layer_norm False, "
        "dropout None): Error(s) in loading state_dict for HypernetworkModule: "
    )
    for path, index in (("K", 0), ("V", 1)):
        broken = _states(source)
        del broken[6][index]["linear.1.bias"]
        assert refused(broken) == prefix.format(path) + 'Missing key(s) in state_dict: "linear.1.bias".'
        extra = _states(source)
        extra[6][index]["linear.9.weight"] = torch.zeros(1)
        assert refused(extra) == prefix.format(path) + 'Unexpected key(s) in state_dict: "linear.9.weight".'
    with pytest.raises(ValueError):  # a K state without its V state
        Hypernetwork(config, sizes=[4]).load_layer_state_dicts({4: (states[4][0],)})


def test_the_torch_activation_table_is_every_parameter_free_width_keeping_class():
    # Called directly: the module-level ACTIVATIONS table is built at import time, before a test can change anything.
    table = _parameter_free_torch_activations()
    known = {
        "celu",
        "elu",
        "gelu",
        "hardshrink",
        "hardsigmoid",
        "hardswish",
        "hardtanh",
        "leakyrelu",
        "logsigmoid",
        "logsoftmax",
        "mish",
        "relu",
        "relu6",
        "rrelu",
        "selu",
        "sigmoid",
        "silu",
        "softmax",
        "softmax2d",
        "softmin",
        "softplus",
        "softshrink",
        "softsign",
        "tanh",
        "tanhshrink",
    }  # fmt: skip  (torch 2.x; a later torch may add more)
    assert known <= set(table)
    # PReLU has a weight, GLU halves the width, Threshold and MultiheadAttention need arguments; the rest are not
    # activation classes of that module
    refused = {"prelu", "glu", "threshold", "multiheadattention", "module", "parameter", "tensor",
               "nondynamicallyquantizablelinear"}  # fmt: skip
    assert not refused & set(table)
    for name, cls in table.items():
        assert cls.__name__.lower() == name and cls.__module__ == "torch.nn.modules.activation"
    assert table["relu"] is nn.ReLU and table["softmax2d"] is nn.Softmax2d
