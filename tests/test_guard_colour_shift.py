"""The colour check warns about a channel whose mean moved by more than `max_mean_shift`, down as well as up,
for each of R, G and B; a small move either way passes. Checked on pooled statistics (`colour_stats`) and through
`evaluate` with a stand-in decoder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hyperlit.data.skips import SkipLog
from hyperlit.vae.colour import ColourLimits, colour_stats, compare_colours
from hyperlit.vae.evaluate import EvalImages, evaluate

LIMIT = ColourLimits().max_mean_shift  # 0.04 of [0, 1]: about 10 of 255 levels


def images() -> torch.Tensor:
    """Textured uint8 images in [60, 190], so a shift of 20 levels never clips."""
    return torch.randint(60, 191, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def shifted(x: torch.Tensor, channel: int, levels: int) -> torch.Tensor:
    y = x.clone().to(torch.int16)
    y[:, channel] += levels
    return y.to(torch.uint8)


def shift_warnings(channel: int, levels: int) -> list[str]:
    x = images()
    check = compare_colours(colour_stats(x), colour_stats(shifted(x, channel, levels)))
    return [w for w in check.warnings if w.startswith("shifts colour")]


@pytest.mark.parametrize("channel", [0, 1, 2])
@pytest.mark.parametrize("levels", [-20, 20])
def test_a_channel_moved_beyond_the_limit_either_way_is_named(channel, levels):
    expected = levels / 255  # the mean moves by exactly that much: nothing clips
    assert abs(expected) > LIMIT
    assert shift_warnings(channel, levels) == [
        f"shifts colour: {'RGB'[channel]} mean {expected:+.3f} (limit ±{LIMIT}, in [0, 1] units)"
    ]


@pytest.mark.parametrize("levels", [-5, 5])
def test_a_small_move_either_way_passes(levels):
    assert abs(levels / 255) < LIMIT
    assert shift_warnings(1, levels) == []


class ChannelShiftVAE(torch.nn.Module):
    """Stand-in VAE: latents are the pixels; the decoder moves one channel by `levels` 8-bit steps."""

    def __init__(self, channel: int, levels: int) -> None:
        super().__init__()
        self.channel, self.levels = channel, levels
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        out = z.clone()
        out[:, self.channel] += self.levels / 127.5
        return SimpleNamespace(sample=out)


def test_evaluate_reports_a_blue_channel_shifted_down():
    data = EvalImages(names=[f"{i}" for i in range(4)], pixels=images(), resolution=16, skips=SkipLog(verbose=False))
    down, up = evaluate([("down", "s", ChannelShiftVAE(2, -20)), ("up", "s", ChannelShiftVAE(2, 20))], data)
    for score, levels in ((down, -20), (up, 20)):
        assert score.colour.mean_shift[2] == pytest.approx(levels / 255)
        assert [w.split(" (")[0] for w in score.colour.warnings] == [f"shifts colour: B mean {levels / 255:+.3f}"]
