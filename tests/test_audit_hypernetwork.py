"""Audit (issue 14, mutmut survivors): hypernetwork layer construction details that change the trained weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig, HypernetworkModule


def test_dropout_follows_the_entry_of_the_layer_it_comes_after():
    # A1111's dropout_structure: entry i+1 applies after the Linear that produces layer i+1
    cfg = HypernetworkConfig(layer_structure=[1, 2, 2, 1], dropout_structure=[0, 0.1, 0.3, 0])
    mlp = HypernetworkModule(8, cfg)
    kinds = [(type(m).__name__, getattr(m, "p", None)) for m in mlp.modules() if isinstance(m, nn.Linear | nn.Dropout)]
    assert kinds == [("Linear", None), ("Dropout", 0.1), ("Linear", None), ("Dropout", 0.3), ("Linear", None)]


@pytest.mark.parametrize(
    ("activation", "gain"), [("relu", math.sqrt(2.0)), ("leakyrelu", math.sqrt(2.0 / (1 + 0.01**2)))]
)
def test_kaiming_init_uses_the_activations_gain(activation, gain):
    # Kaiming normal: std = gain / sqrt(fan_in). The relu and leaky_relu(0.01) gains differ by 0.005%, below what a
    # sample std can show: swapping them is an equivalent mutant (docs/testing.md); a wrong init is not.
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
