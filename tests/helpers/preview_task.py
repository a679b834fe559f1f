"""A tiny-base hypernetwork task whose network changes every image: what the preview tests render."""

from __future__ import annotations

from functools import partial

import torch

from hyperlit.attention import attach_hypernetworks
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.models import load_components
from hyperlit.models.family import FAMILIES
from hyperlit.tasks.hypernetwork.module import HypernetworkTask

TINY_WIDTHS = [*FAMILIES["tiny"].attention_widths, FAMILIES["tiny"].context_dim]


def strong_hypernetwork_task() -> HypernetworkTask:
    """The tiny model with a relu 1-2-1 network whose weights (N(0, 0.3), seed 0) are large enough to show."""
    components = load_components(family="tiny")
    hn = Hypernetwork(HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu"), sizes=TINY_WIDTHS, name="hn")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    attach_hypernetworks(components.unet, [hn])
    return HypernetworkTask(hypernetwork=hn, components=components, optimizer=partial(torch.optim.AdamW))
