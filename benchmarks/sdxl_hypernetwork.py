"""What an SDXL hypernetwork costs in the UNet's 1280-level transformer blocks, as ratios measured in one process.

    python benchmarks/sdxl_hypernetwork.py                # 2 transformer layers, 16x16 tokens (512 px), fp32 CPU
    python benchmarks/sdxl_hypernetwork.py --layers 10 --side 32 --steps 5   # a whole SDXL block at 1024 px

One arm = forward + backward of an SDXL 1280-level Transformer2DModel (20 heads x 64, context 2048, linear
projections) with: no hypernetwork | sizes [2048] (cross-attention only) | sizes [2048, 640, 1280] (auto). SDXL has
ten such layers per 1280-level block and six blocks (2 down, 1 mid, 3 up), so the 1280 self-attention module runs
in 60+ attention layers per UNet forward. Arms alternate (A B C A B C ...) and the median time of each is reported
relative to the bare block. No GPU here: GPU ratios are expected to be lower (matmuls are cheaper there relative to
the per-layer overhead) and are not measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from hyperlit.attention import attach_hypernetworks, detach_hypernetworks
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig


def block(layers: int) -> Transformer2DModel:
    return Transformer2DModel(
        num_attention_heads=20, attention_head_dim=64, in_channels=1280, num_layers=layers,
        cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    ).requires_grad_(False)  # fmt: skip


def step(model: Transformer2DModel, x: torch.Tensor, context: torch.Tensor, params: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    out = model(x, encoder_hidden_states=context).sample
    out.float().pow(2).mean().backward()
    for p in params:
        p.grad = None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--side", type=int, default=16, help="latent side at the 1280 level (1024 px -> 32)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = block(args.layers)
    x = torch.randn(1, 1280, args.side, args.side, requires_grad=True)  # gradients flow through the frozen block
    context = torch.randn(1, 77, 2048)
    config = HypernetworkConfig(activation="swish")
    arms = {
        "none": None,
        "[2048]": Hypernetwork(config, sizes=[2048]),
        "[2048, 640, 1280]": Hypernetwork(config, sizes=[2048, 640, 1280]),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(args.steps + 1):  # the first round warms up
        for name, hn in arms.items():
            if hn is None:
                detach_hypernetworks(model)
                params: list[torch.Tensor] = [x]
            else:
                attach_hypernetworks(model, [hn])
                params = [x, *hn.parameters()]
            t = step(model, x, context, params)
            if i:
                times[name].append(t)
    base = statistics.median(times["none"])
    print(f"SDXL 1280-level transformer, {args.layers} layers, {args.side}x{args.side} tokens, fp32 CPU")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  hypernetwork {name:<18} {median * 1000:8.1f} ms  x{median / base:.3f}")


if __name__ == "__main__":
    main()
