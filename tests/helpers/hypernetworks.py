"""Hypernetworks with large random weights for tests that compare what two implementations compute."""

from __future__ import annotations

import torch

from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig


def randomised(config: HypernetworkConfig, sizes: list[int], seed: int = 0, **kwargs) -> Hypernetwork:
    """O(1) random weights, so any difference in the computed function shows; kwargs go to Hypernetwork."""
    hn = Hypernetwork(config, sizes=sizes, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in hn.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return hn
