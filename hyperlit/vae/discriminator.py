"""PatchGAN discriminator (the pix2pix / taming "NLayerDiscriminator" shape).

n_layers=3, ndf=64 on 3-channel input gives 2 765 633 parameters, 30×30 logits at 256² and a 70×70
receptive field, matching the discriminator every public SD-VAE GAN recipe uses.
"""

from __future__ import annotations

from torch import Tensor, nn

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # GroupNorm needs no batch statistics, so real and fake passes cannot differ by class statistics.
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """Conv(k4 s2) + LeakyReLU, then (n_layers-1) strided conv-norm-LReLU, one stride-1 block, a 1-channel head.

    The channel multiplier is capped at 8×. Convs followed by a norm carry no bias (the norm supplies it),
    except with ``norm="none"``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"disc.norm={norm!r} is not supported; allowed: {', '.join(NORMS)}")
        if n_layers < 1:
            raise ValueError(f"disc.n_layers={n_layers} must be >= 1")
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # pix2pix/taming init: conv N(0, 0.02); norm scale N(1, 0.02), shift 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
