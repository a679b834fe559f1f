"""hypernet.input_noise: Gaussian noise on the MLP's input in training only, scaled per context vector.

Each check compares the module with a hand computation of x + mlp(x + eps * s * std(x)) that draws eps itself from
the same seed, or with the module at input_noise 0; the file formats are checked from their bytes.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from hyperlit import files
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig, HypernetworkModule


def module(noise: float, width: int = 16, **options) -> HypernetworkModule:
    torch.manual_seed(0)
    m = HypernetworkModule(width, HypernetworkConfig(activation="relu", input_noise=noise, **options))
    for p in m.parameters():  # A1111's Normal init gives tiny weights; larger ones make the MLP's input matter
        torch.nn.init.normal_(p, std=0.5)
    return m


def context(batch: int = 2, tokens: int = 5, width: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    # token vectors of different scales, as a text encoder's hidden states: the noise must follow each one's std
    return torch.randn(batch, tokens, width) * torch.linspace(0.5, 4.0, tokens)[None, :, None] + 0.3


def mlp_by_hand(m: HypernetworkModule, x: torch.Tensor) -> torch.Tensor:
    """The Linear / ReLU / Linear stack applied with torch.nn.functional, not through the module's Sequential."""
    first, second = m.linear[0], m.linear[2]
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, first.weight, first.bias)),
                                      second.weight, second.bias)  # fmt: skip


def test_training_output_is_the_hand_computation_with_the_same_draw():
    m, x = module(0.5), context()
    m.train()
    torch.manual_seed(7)
    out = m(x)
    torch.manual_seed(7)
    eps = torch.randn_like(x)
    std = x.std(dim=-1, keepdim=True)
    expected = x + mlp_by_hand(m, x + eps * 0.5 * std)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # the residual path stays the clean context: with the MLP's output zeroed, the module is the identity
    torch.nn.init.zeros_(m.linear[2].weight)
    torch.nn.init.zeros_(m.linear[2].bias)
    assert torch.equal(m(x), x)


def test_the_noise_is_scaled_by_each_context_vectors_std():
    """A linear MLP equal to the identity passes the noise through: out - 2x is the noise itself."""
    width = 4096
    m = HypernetworkModule(width, HypernetworkConfig(layer_structure=[1, 1], input_noise=0.3))
    torch.nn.init.eye_(m.linear[0].weight)
    torch.nn.init.zeros_(m.linear[0].bias)
    m.train()
    x = context(batch=1, tokens=4, width=width)
    noise = m(x) - 2 * x
    ratio = noise.std(dim=-1) / x.std(dim=-1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.3), rtol=0.05, atol=0)
    assert noise.mean(dim=-1).abs().max() < 0.05 * x.std(dim=-1).min()  # zero-mean


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_inference_never_adds_noise_and_zero_never_draws(noise):
    """Eval mode (a preview, A1111, ComfyUI) is the network without noise, bit for bit; input_noise 0 in training
    is the noiseless forward and leaves the random stream untouched (a run's draws stay what they were)."""
    x = context()
    quiet, noisy = module(0.0), module(noise)
    quiet.eval()
    noisy.eval()
    torch.manual_seed(3)
    assert torch.equal(noisy(x), quiet(x))
    after = torch.randn(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.randn(4))  # no draw in eval mode
    quiet.train()
    torch.manual_seed(3)
    out = quiet(x)
    after = torch.randn(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.randn(4))
    torch.testing.assert_close(out, x + mlp_by_hand(quiet, x), rtol=1e-6, atol=1e-6)


def test_noise_and_dropout_both_apply_in_training():
    m = module(0.5, dropout_structure=0.5)
    m.train()
    x = context()
    torch.manual_seed(11)
    out = m(x)
    torch.manual_seed(11)
    noisy_input = x + torch.randn_like(x) * 0.5 * x.std(dim=-1, keepdim=True)
    first, second = m.linear[0], m.linear[3]  # Linear, ReLU, Dropout, Linear
    hidden = torch.nn.functional.dropout(torch.relu(first(noisy_input)), p=0.5, training=True)
    torch.testing.assert_close(out, x + second(hidden), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "a lot", True, None])
def test_bad_values_are_one_line_errors_naming_the_key(bad):
    with pytest.raises(ValueError) as info:
        HypernetworkConfig(input_noise=bad)
    message = str(info.value)
    assert message.startswith("hypernet.input_noise: ") and repr(bad) in message and ">= 0" in message
    assert "\n" not in message


def test_a1111_file_has_no_trace_of_it_and_hyperlit_safetensors_keep_it(tmp_path):
    config = HypernetworkConfig(activation="relu", input_noise=0.5)
    hn = Hypernetwork(config, sizes=[8], name="style")
    plain = Hypernetwork(HypernetworkConfig(activation="relu"), sizes=[8], name="style")
    plain.load_state_dict(hn.state_dict())
    files.save_hypernetwork(hn, tmp_path / "noisy.pt")
    files.save_hypernetwork(plain, tmp_path / "plain.pt")
    noisy_raw = torch.load(tmp_path / "noisy.pt", weights_only=True)
    plain_raw = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert "input_noise" not in noisy_raw and noisy_raw.keys() == plain_raw.keys()
    assert files.load_hypernetwork(tmp_path / "noisy.pt").config.input_noise == 0.0
    target = tmp_path / "noisy.hyperlit.safetensors"
    files.save_hypernetwork(hn, target)
    with safe_open(str(target), "pt") as f:
        assert '"input_noise": 0.5' in f.metadata()["config"]
    assert files.load_hypernetwork(target).config.input_noise == 0.5


def test_an_init_from_continuation_trains_with_this_runs_noise(tmp_path):
    """A1111 files carry no input_noise; continuing one uses the run's value (the command line's or the family's),
    in every module, and keeps the file's weights."""
    from diffusers.models.attention_processor import Attention
    from omegaconf import OmegaConf

    from hyperlit.tasks.hypernetwork.build import build_hypernetwork

    torch.manual_seed(0)
    old = Hypernetwork(HypernetworkConfig(activation="relu"), sizes=[12, 8], name="old")
    files.save_hypernetwork(old, tmp_path / "old.pt")
    unet = torch.nn.ModuleList([Attention(query_dim=8, cross_attention_dim=12), Attention(query_dim=8)])
    cfg = OmegaConf.create({"hypernet": {"name": "new", "init_from": str(tmp_path / "old.pt")}})
    hn = build_hypernetwork(cfg, HypernetworkConfig(activation="relu", input_noise=0.5), unet)
    noises = [m.input_noise for m in hn.modules() if isinstance(m, HypernetworkModule)]
    assert hn.config.input_noise == 0.5 and noises == [0.5] * 4
    for key, value in old.state_dict().items():
        assert torch.equal(hn.state_dict()[key], value)


def test_gradient_reaches_the_input_through_the_noise_scale_too():
    """On self-attention widths the input carries gradient; the noise's scale is part of the graph, as in the runs
    measured in docs/benchmarks.md (a detached scale trains a different network)."""
    m = module(0.5)
    m.train()
    x = context().requires_grad_(True)
    torch.manual_seed(5)
    (m(x) ** 2).sum().backward()
    got = x.grad.clone()
    x2 = context().requires_grad_(True)
    torch.manual_seed(5)
    eps = torch.randn_like(x2)
    ((x2 + mlp_by_hand(m, x2 + eps * 0.5 * x2.std(dim=-1, keepdim=True))) ** 2).sum().backward()
    torch.testing.assert_close(got, x2.grad, rtol=1e-5, atol=1e-5)
