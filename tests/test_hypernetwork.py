"""Hypernetwork modules: A1111's Sequential layout and indices, parameter count, initialisation, forward, config."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.a1111_reference import ReferenceModule, a1111_sequential
from helpers.hypernetworks import randomised
from torch import nn

from hyperlit.hypernetwork import ACTIVATIONS, Hypernetwork, HypernetworkConfig, HypernetworkModule


def _layer_types(module: HypernetworkModule) -> list[type]:
    return [type(layer) for layer in module.linear]


def _keys(module: nn.Module) -> list[str]:
    return list(module.state_dict())


# Worked index examples of A1111's builder: (config, Sequential layer types, keys of the parametrised layers).
INDEX_TABLE = [
    pytest.param(
        dict(layer_structure=[1, 2, 1], activation="linear"),
        [nn.Linear, nn.Linear],
        ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"],
        id="nai-default",
    ),
    pytest.param(
        dict(layer_structure=[1, 2, 1], activation="relu", activate_output=False),
        [nn.Linear, nn.ReLU, nn.Linear],
        ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"],
        id="relu-no-ao",
    ),
    pytest.param(
        dict(layer_structure=[1, 2, 1], activation="relu", activate_output=True, layer_norm=True),
        [nn.Linear, nn.ReLU, nn.LayerNorm, nn.Linear, nn.ReLU, nn.LayerNorm],
        [f"linear.{i}.{p}" for i in (0, 2, 3, 5) for p in ("weight", "bias")],
        id="relu-ao-ln",
    ),
    pytest.param(
        dict(layer_structure=[1, 2, 2, 1], activation="swish", dropout_structure=[0, 0.3, 0.3, 0]),
        [nn.Linear, nn.Hardswish, nn.Dropout, nn.Linear, nn.Hardswish, nn.Dropout, nn.Linear],
        [f"linear.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")],
        id="swish-dropout",
    ),
    pytest.param(
        dict(layer_structure=[1, 2, 1], activation="linear", dropout_structure=[0, 0.3, 0]),
        [nn.Linear, nn.Dropout, nn.Linear],
        ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"],
        id="linear-dropout",
    ),
]


@pytest.mark.parametrize(("options", "layer_types", "keys"), INDEX_TABLE)
def test_worked_index_table(options: dict, layer_types: list[type], keys: list[str]) -> None:
    d = 8
    hn = Hypernetwork(HypernetworkConfig(**options), sizes=[d, 16])
    for width in (d, 16):
        k_module, v_module = hn.pairs[str(width)]
        for module in (k_module, v_module):
            assert _layer_types(module) == layer_types
            assert _keys(module) == keys
            # Shapes follow int(d * ls[i]) -> int(d * ls[i + 1]); LayerNorm has the output width.
            structure = options["layer_structure"]
            linears = [layer for layer in module.linear if isinstance(layer, nn.Linear)]
            assert [tuple(lin.weight.shape) for lin in linears] == [
                (int(width * structure[i + 1]), int(width * structure[i])) for i in range(len(structure) - 1)
            ]
    # The same keys as an A1111-style Sequential built independently from the spec's rule.
    reference = ReferenceModule(
        a1111_sequential(
            d,
            options["layer_structure"],
            options["activation"],
            options.get("activate_output", False),
            options.get("layer_norm", False),
            options.get("dropout_structure") or [0.0] * len(options["layer_structure"]),
        )
    )
    assert _keys(reference) == keys
    assert {k: v.shape for k, v in reference.state_dict().items()} == {
        k: v.shape for k, v in hn.pairs[str(d)][0].state_dict().items()
    }


def test_fractional_structure_truncates_like_int() -> None:
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 1.5, 1]), sizes=[9])
    first, second = hn.pairs["9"][0].linear
    assert tuple(first.weight.shape) == (13, 9)  # int(9 * 1.5) = 13
    assert tuple(second.weight.shape) == (9, 13)


def test_parameter_count_default_sizes() -> None:
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1]), sizes=[768, 320, 640, 1280])
    assert hn.parameter_count() == 21_939_840
    assert sum(p.numel() for p in hn.parameters()) == 21_939_840
    assert hn.sizes == [768, 320, 640, 1280]


# --- initialisation (A1111's schemes) ---


def _linears_and_norms(hn: Hypernetwork) -> tuple[list[nn.Linear], list[nn.LayerNorm]]:
    layers = [layer for module in hn.modules() if isinstance(module, HypernetworkModule) for layer in module.linear]
    return ([m for m in layers if isinstance(m, nn.Linear)], [m for m in layers if isinstance(m, nn.LayerNorm)])


@pytest.mark.parametrize("weight_init", ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
def test_layer_norm_is_normal_001_and_biases_zero_for_every_init(weight_init: str) -> None:
    torch.manual_seed(0)
    hn = Hypernetwork(
        HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", layer_norm=True, weight_init=weight_init),
        sizes=[320],
    )
    linears, norms = _linears_and_norms(hn)
    assert len(linears) == 4 and len(norms) == 4  # K and V, two of each
    gains = torch.cat([norm.weight.detach() for norm in norms])  # 2 * (640 + 320) = 1920 samples
    assert abs(gains.std().item() - 0.01) < 0.001
    assert abs(gains.mean().item()) < 0.002
    assert gains.abs().max().item() < 0.06  # near 0, not torch's default of ones
    for layer in linears + norms:
        assert torch.count_nonzero(layer.bias) == 0


def _weights(hn: Hypernetwork) -> list[torch.Tensor]:
    return [layer.weight.detach() for layer in _linears_and_norms(hn)[0]]


def test_normal_init_std_001() -> None:
    torch.manual_seed(1)
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1]), sizes=[320])
    for weight in _weights(hn):  # 204,800 samples each
        assert abs(weight.std().item() - 0.01) < 0.0002
        assert abs(weight.mean().item()) < 0.0002


@pytest.mark.parametrize("activation", ["relu", "leakyrelu"])
@pytest.mark.parametrize("weight_init", ["XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
def test_xavier_and_kaiming_statistics(weight_init: str, activation: str) -> None:
    torch.manual_seed(2)
    hn = Hypernetwork(
        HypernetworkConfig(layer_structure=[1, 2, 1], activation=activation, weight_init=weight_init), sizes=[128]
    )
    linears, _ = _linears_and_norms(hn)
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        weight = layer.weight.detach()
        if weight_init.startswith("Xavier"):
            expected_std = math.sqrt(2.0 / (fan_in + fan_out))  # gain 1
        else:
            # fan_in mode, a=0: the gain is sqrt(2) for relu and for leaky_relu with slope 0 alike.
            expected_std = math.sqrt(2.0 / fan_in)
        assert weight.std().item() == pytest.approx(expected_std, rel=0.03)
        assert abs(weight.mean().item()) < 0.02 * expected_std + 1e-4
        bound = math.sqrt(3.0) * expected_std
        if weight_init.endswith("Uniform"):
            assert weight.abs().max().item() <= bound * (1 + 1e-6)
        else:  # 32,768 normal samples reach well beyond the uniform bound
            assert weight.abs().max().item() > 1.5 * bound
        assert torch.count_nonzero(layer.bias) == 0
        assert weight.std().item() > 0.02  # not the N(0, 0.01) scheme


# --- forward (residual; multiplier 1 in training mode) ---


def test_forward_is_residual_times_multiplier_in_eval() -> None:
    hn = randomised(HypernetworkConfig(layer_structure=[1, 2, 1], activation="tanh"), sizes=[8]).eval()
    x = torch.randn(2, 5, 8)
    k_module = hn.pairs["8"][0]
    w1, b1 = k_module.linear[0].weight, k_module.linear[0].bias
    w2, b2 = k_module.linear[2].weight, k_module.linear[2].bias
    mlp = torch.tanh(x @ w1.T + b1) @ w2.T + b2  # no activation after the last Linear (activate_output False)
    for multiplier in (1.0, 0.5, 0.0, -2.0):
        hn.multiplier = multiplier
        assert k_module.multiplier == multiplier and hn.pairs["8"][1].multiplier == multiplier
        k, _ = hn.forward_kv(x)
        torch.testing.assert_close(k, x + mlp * multiplier, atol=1e-6, rtol=0)
    hn.multiplier = 0.0
    assert torch.equal(hn.forward_kv(x)[0], x)


def test_multiplier_is_one_in_train_mode() -> None:
    config = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", multiplier=0.25)
    hn = randomised(config, sizes=[8])
    x = torch.randn(3, 8)
    hn.eval()
    k_eval, v_eval = hn.forward_kv(x)
    hn.train()
    k_train, v_train = hn.forward_kv(x)
    # Without dropout the MLP is the same function in both modes: only the multiplier differs.
    torch.testing.assert_close(k_train - x, (k_eval - x) / 0.25, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v_train - x, (v_eval - x) / 0.25, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(k_train, k_eval)


def test_forward_kv_routes_by_last_dim_and_passes_other_widths_through() -> None:
    hn = randomised(HypernetworkConfig(layer_structure=[1, 2, 1], activation="elu"), sizes=[8, 12]).eval()
    for width in (8, 12):
        x = torch.randn(2, 4, width)
        k, v = hn.forward_kv(x)
        k_module, v_module = hn.pairs[str(width)]
        assert torch.equal(k, k_module(x)) and torch.equal(v, v_module(x))
        assert not torch.allclose(k, x) and not torch.allclose(v, x)
        assert not torch.allclose(k, v)  # K and V are separate MLPs
        assert torch.equal(hn(x)[0], k)
    other = torch.randn(2, 4, 10)
    k, v = hn.forward_kv(other)
    assert k is other and v is other
    # Width 8 and 12 inputs of the same batch shape are routed by the LAST dim, not the sequence length.
    x = torch.randn(2, 12, 8)
    assert torch.equal(hn.forward_kv(x)[0], hn.pairs["8"][0](x))


def test_k_and_v_are_different_modules() -> None:
    torch.manual_seed(3)
    hn = Hypernetwork(HypernetworkConfig(), sizes=[8])
    k_module, v_module = hn.pairs["8"]
    assert k_module is not v_module
    k_params, v_params = list(k_module.parameters()), list(v_module.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a in k_params for b in v_params)
    assert not torch.equal(k_params[0], v_params[0])  # independently initialised
    with torch.no_grad():
        k_params[0].add_(1.0)
    assert not torch.equal(k_params[0], v_params[0] + 1.0)


def test_all_activation_names_build_and_swish_is_hardswish() -> None:
    for name in ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish", "gelu"):
        assert name in ACTIVATIONS
    module = Hypernetwork(HypernetworkConfig(activation="swish"), sizes=[4]).pairs["4"][0]
    assert isinstance(module.linear[1], nn.Hardswish)
    assert not any(isinstance(layer, nn.SiLU) for layer in module.linear)
    assert "prelu" not in ACTIVATIONS  # would add weight keys other loaders do not expect


# --- config validation: every error names the field and the allowed values ---


@pytest.mark.parametrize(
    ("options", "field", "allowed"),
    [
        (dict(layer_structure=[2, 2, 1]), "hypernet.layer_structure", "start and end with 1"),
        (dict(layer_structure=[1, 2, 2]), "hypernet.layer_structure", "start and end with 1"),
        (dict(layer_structure=[1, 0, 1]), "hypernet.layer_structure", "numbers > 0"),
        (dict(layer_structure=[1, -2, 1]), "hypernet.layer_structure", "numbers > 0"),
        (dict(layer_structure=[1]), "hypernet.layer_structure", "at least two entries"),
        (dict(layer_structure=[]), "hypernet.layer_structure", "at least two entries"),
        (dict(layer_structure="1,2,1"), "hypernet.layer_structure", "list of numbers"),
        (dict(layer_structure=[1, float("nan"), 1]), "hypernet.layer_structure", "numbers > 0"),
        (dict(activation="swishy"), "hypernet.activation", "relu"),
        (dict(activation=None), "hypernet.activation", "leakyrelu"),
        (dict(weight_init="He"), "hypernet.weight_init", "Normal, XavierUniform, XavierNormal, KaimingUniform"),
        (dict(dropout_structure=[0, 0.3]), "hypernet.dropout_structure", "needs 3"),
        (dict(dropout_structure=[0, 0.3, 0, 0]), "hypernet.dropout_structure", "needs 3"),
        (dict(dropout_structure=[0, 1.0, 0]), "hypernet.dropout_structure", "[0, 1)"),
        (dict(dropout_structure=[0, 1.5, 0]), "hypernet.dropout_structure", "[0, 1)"),
        (dict(dropout_structure=[0, -0.1, 0]), "hypernet.dropout_structure", "[0, 1)"),
        (dict(dropout_structure="0,0.3,0"), "hypernet.dropout_structure", "[0, 1)"),
        (dict(sizes=[]), "hypernet.sizes", "'auto' or a list of widths"),
        (dict(sizes="all"), "hypernet.sizes", "'auto' or a list of widths"),
        (dict(sizes=[768, 0]), "hypernet.sizes", "positive integers"),
        (dict(sizes=[768, -320]), "hypernet.sizes", "positive integers"),
        (dict(sizes=[768.0]), "hypernet.sizes", "positive integers"),
        (dict(sizes=[True]), "hypernet.sizes", "positive integers"),
        (dict(sizes=[768, 768]), "hypernet.sizes", "listed twice"),
        (dict(activate_output="yes"), "hypernet.activate_output", "true or false"),
        (dict(layer_norm=1), "hypernet.layer_norm", "true or false"),
        (dict(multiplier=float("inf")), "hypernet.multiplier", "finite"),
    ],
)
def test_config_errors_name_field_and_allowed_values(options: dict, field: str, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        HypernetworkConfig(**options)
    message = str(info.value)
    assert message.startswith(field + ":"), message
    assert allowed in message, message


def test_unknown_activation_message_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="hypernet.activation") as info:
        HypernetworkConfig(activation="swishy")
    listed = str(info.value).split("allowed:", 1)[1]
    for name in ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish"):
        assert name in [part.strip() for part in listed.split(",")]


def test_valid_config_normalises_values() -> None:
    config = HypernetworkConfig(
        layer_structure=[1.0, 2.0, 1.5, 1.0], dropout_structure=[0, 0.3, 0, 0], sizes=[768, 320], multiplier=1
    )
    assert config.layer_structure == [1, 2, 1.5, 1]
    assert config.dropout_structure == [0.0, 0.3, 0.0, 0.0]
    assert config.use_dropout and isinstance(config.multiplier, float)
    assert HypernetworkConfig().use_dropout is False
    assert HypernetworkConfig().dropout_probabilities() == [0.0, 0.0, 0.0]


def test_layer_too_narrow_for_width_is_an_error() -> None:
    with pytest.raises(ValueError, match="hypernet.layer_structure"):
        Hypernetwork(HypernetworkConfig(layer_structure=[1, 0.1, 1]), sizes=[4])
    with pytest.raises(ValueError, match="hypernet.sizes"):
        Hypernetwork(HypernetworkConfig(sizes="auto"))
