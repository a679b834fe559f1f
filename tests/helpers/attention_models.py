"""A tiny SD-shaped UNet and a stand-in hypernetwork, shared by the attention tests."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig

SELF_WIDTHS = [32, 64]
CROSS_WIDTH = 48
CROSS_LAYERS = 7  # cross-attention layers of make_unet(): 2 down, 1 mid, 4 up


class ToyHypernetwork(nn.Module):
    """Stand-in with the Hypernetwork contract: per width a K and a V module, `x + tanh(W x + b) * m`."""

    def __init__(self, sizes: list[int], multiplier: float = 1.0, seed: int = 0, scale: float = 0.5):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.multiplier = multiplier
        self.sizes = list(sizes)
        self.k = nn.ModuleDict({str(s): nn.Linear(s, s) for s in sizes})
        self.v = nn.ModuleDict({str(s): nn.Linear(s, s) for s in sizes})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def path(self, which: str, x: Tensor) -> Tensor:
        """Reference computation of one path, written independently of forward_kv's call structure."""
        lin = (self.k if which == "k" else self.v)[str(x.shape[-1])]
        return x + torch.tanh(x @ lin.weight.T + lin.bias) * self.multiplier

    def forward_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        key = str(context.shape[-1])
        if key not in self.k:
            return context, context
        m = self.multiplier
        return context + torch.tanh(self.k[key](context)) * m, context + torch.tanh(self.v[key](context)) * m


def make_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.requires_grad_(False)
    return unet.eval()


def inputs(seed: int = 1, batch: int = 2) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 500][:batch]),
        "encoder_hidden_states": torch.randn(batch, 7, CROSS_WIDTH, generator=gen),
    }


def real_hypernetwork(
    seed: int = 0, dropout: list[float] | None = None, multiplier: float = 1.0, input_noise: float = 0.0
) -> Hypernetwork:
    config = HypernetworkConfig(
        layer_structure=[1, 2, 1],
        activation="swish",
        dropout_structure=dropout,
        multiplier=multiplier,
        input_noise=input_noise,
    )
    hn = Hypernetwork(config, sizes=SELF_WIDTHS + [CROSS_WIDTH])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # A1111's N(0, 0.01) init is nearly the identity: make the networks matter
        for p in hn.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return hn


class CrossCalls:
    """Counts calls of the cross-width (K) modules of real hypernetworks."""

    def __init__(self, *hypernetworks: Hypernetwork):
        self.count = 0
        self.handles = [hn.pairs[str(CROSS_WIDTH)][0].register_forward_hook(self.hit) for hn in hypernetworks]

    def hit(self, *_: object) -> None:
        self.count += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
