"""One hypernetwork training step on an SD1.5-shaped UNet (random weights), against the bare frozen UNet.

    python benchmarks/hn_step.py --resolution 256 --batch 1 --device cpu --dtype fp32
    python benchmarks/hn_step.py --small                      # a narrow UNet: a quick run of every row
    python benchmarks/hn_step.py --device cuda --dtype bf16   # GPU: frozen UNet in bf16, hypernetwork fp32

Rows, all on one UNet's weights (each row has its own module tree sharing them) and interleaved (A B C ... A B C):
  bare       the frozen UNet's forward + backward to its input (no hypernetwork): the baseline
  default    hyperlit: text-context K/V once per forward (issue 12), no checkpointing
  per-layer  hyperlit before issue 12: every layer computes its own text-context K/V
  ckpt       default + gradient checkpointing of every ResNet/transformer block (train.gradient_checkpointing)
  compiled   default + torch.compile of the UNet (train.compile); its first call (compilation) is reported apart
  a1111      A1111-style: per-layer K/V + checkpointing (A1111 always checkpoints when training hypernetworks)
For each: step time (min over repeats; the median is printed too), FLOPs (torch.utils.flop_counter, backward and
recomputation included) and activation memory (unique storages saved for backward or held by checkpoints,
parameters excluded), each as a ratio to bare. The FLOP limit is bare + the hypernetwork's own FLOPs with the
text-context network counted once, as if it cost nothing to apply. Hypernetwork: A1111 default sizes, [1, 2, 1],
swish, in training mode. `--loop` adds Lightning's step vs a hand-written loop on the tiny model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from hyperlit.attention import attach_hypernetworks, unet_attention_widths  # noqa: E402
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig  # noqa: E402
from hyperlit.models.family import FAMILIES  # noqa: E402
from hyperlit.speed import compile_unet, enable_gradient_checkpointing, use_channels_last  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROWS = ("bare", "default", "per-layer", "ckpt", "compiled", "a1111")
# --small: SD1.5's layout and context width (768) with narrow blocks, for a quick run of every row
SMALL = {"block_out_channels": [32, 64, 128, 128], "norm_num_groups": 8}


@dataclass
class Row:
    name: str
    unet: nn.Module
    hypernetwork: bool
    seconds: list[float] = field(default_factory=list)
    first_call: float | None = None
    flops: int | None = None
    saved_bytes: int | None = None

    @property
    def best(self) -> float:
        return min(self.seconds)


def shared_weights_copy(unet: nn.Module) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors: rows get their own processors and flags."""
    memo = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    return copy.deepcopy(unet, memo)


def build_unet(small: bool, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    config = UNet2DConditionModel.load_config(FAMILIES["sd15"].config_dir / "unet")
    if small:
        config = {**config, **SMALL}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype)
    unet.requires_grad_(False).eval()
    use_channels_last(unet, device)
    return unet


def build_rows(unet: nn.Module, hn: Hypernetwork, names: list[str]) -> list[Row]:
    rows = []
    for name in names:
        view = unet if name == "bare" else shared_weights_copy(unet)
        if name != "bare":
            attach_hypernetworks(view, [hn], share_text_context=name not in ("per-layer", "a1111"))
        if name in ("ckpt", "a1111"):
            enable_gradient_checkpointing(view)
        if name == "compiled":
            compile_unet(view)
        rows.append(Row(name, view, name != "bare"))
    return rows


@dataclass
class Batch:
    sample: Tensor
    timestep: Tensor
    context: Tensor
    target: Tensor


def make_batch(batch: int, resolution: int, device: torch.device, dtype: torch.dtype) -> Batch:
    gen = torch.Generator().manual_seed(1)
    latent = (batch, 4, resolution // 8, resolution // 8)
    return Batch(
        sample=torch.randn(latent, generator=gen).to(device, dtype),
        timestep=torch.randint(0, 1000, (batch,), generator=gen).to(device),
        context=torch.randn(batch, 77, 768, generator=gen).to(device, dtype),
        target=torch.randn(latent, generator=gen).to(device),
    )


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    # Frozen weights are already in `dtype`; autocast runs the fp32 hypernetwork's matmuls in it too.
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def step(row: Row, hn: Hypernetwork, batch: Batch, device: torch.device, dtype: torch.dtype) -> None:
    """Forward + backward. Bare: gradient to the input (nothing else needs one). Others: to the hypernetwork."""
    hn.zero_grad(set_to_none=True)
    sample = batch.sample.detach().requires_grad_(not row.hypernetwork)
    with autocast(device, dtype):
        out = row.unet(sample, batch.timestep, batch.context).sample
    F.mse_loss(out.float(), batch.target).backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedTensors:
    """Bytes kept for backward: unique storages packed by autograd or held as checkpoint inputs, minus weights."""

    def __init__(self, weights: list[Tensor]):
        self.weights = {w.untyped_storage().data_ptr() for w in weights}
        self.storages: dict[int, int] = {}

    def add(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.storages[storage.data_ptr()] = storage.nbytes()

    def pack(self, t: Tensor) -> Tensor:
        self.add(t)
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @contextlib.contextmanager
    def watching(self, unet: nn.Module) -> Iterator[None]:
        # A non-reentrant checkpoint hides its region's saved tensors behind its own hooks and keeps the block's
        # arguments alive instead: count those.
        wrapped = []
        for module in unet.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(module, "gradient_checkpointing", False) and func is not None:
                wrapped.append((module, func))
                module._gradient_checkpointing_func = self._recording(func)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            for module, func in wrapped:
                module._gradient_checkpointing_func = func

    def _recording(self, func: Callable) -> Callable:
        def checkpoint(block: nn.Module, *args: object) -> object:
            if torch.is_grad_enabled():
                for arg in args:
                    values = arg.values() if isinstance(arg, dict) else [arg]
                    for value in values:
                        if isinstance(value, Tensor):
                            self.add(value)
            return func(block, *args)

        return checkpoint


def saved_bytes(row: Row, hn: Hypernetwork, batch: Batch, device: torch.device, dtype: torch.dtype) -> int:
    tracker = SavedTensors([*row.unet.parameters(), *row.unet.buffers(), *hn.parameters()])
    hn.zero_grad(set_to_none=True)
    sample = batch.sample.detach().requires_grad_(not row.hypernetwork)
    with tracker.watching(row.unet), autocast(device, dtype):
        out = row.unet(sample, batch.timestep, batch.context).sample
        loss = F.mse_loss(out.float(), batch.target)
    total = tracker.total  # everything is packed by the end of the forward
    loss.backward()
    return total


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def hypernetwork_own_flops(row: Row, hn: Hypernetwork, batch: Batch, device, dtype) -> int:
    """FLOPs of the hypernetwork alone on the contexts it sees in one step (forward + backward), each call once."""
    calls: list[tuple[Tensor, bool]] = []
    original = hn.forward_kv

    def recording(context: Tensor) -> tuple[Tensor, Tensor]:
        calls.append((context.detach().clone(), context.requires_grad))
        return original(context)

    hn.forward_kv = recording
    try:
        step(row, hn, batch, device, dtype)
    finally:
        del hn.forward_kv

    def run() -> None:
        for context, needs_grad in calls:
            x = context.requires_grad_(needs_grad)
            with autocast(device, dtype):
                k, v = hn.forward_kv(x.float())
            torch.autograd.backward([k, v], [torch.ones_like(k), torch.ones_like(v)])

    return count_flops(run)


def timed(row: Row, hn: Hypernetwork, batch: Batch, device, dtype) -> float:
    synchronize(device)
    start = time.perf_counter()
    step(row, hn, batch, device, dtype)
    synchronize(device)
    return time.perf_counter() - start


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.3f}"


def report(rows: list[Row], limit_flops: int | None) -> dict[str, Row]:
    by = {row.name: row for row in rows}
    bare = by["bare"]
    print(f"\n{'row':<10} {'s/step min':>10} {'median':>8} {'time/bare':>9} {'GFLOP':>8} {'FLOP/bare':>9} "
          f"{'saved MiB':>9} {'mem/bare':>8}")  # fmt: skip
    for row in rows:
        gflop = "n/a" if row.flops is None else f"{row.flops / 1e9:.1f}"
        mib = "n/a" if row.saved_bytes is None else f"{row.saved_bytes / 2**20:.0f}"
        print(
            f"{row.name:<10} {row.best:>10.3f} {statistics.median(row.seconds):>8.3f} {ratio(row.best, bare.best):>9} "
            f"{gflop:>8} {ratio(row.flops, bare.flops):>9} {mib:>9} {ratio(row.saved_bytes, bare.saved_bytes):>8}"
        )
    if limit_flops is not None:
        print(f"{'limit':<10} {'':>10} {'':>8} {'':>9} {limit_flops / 1e9:>8.1f} {ratio(limit_flops, bare.flops):>9}")
    if "compiled" in by and by["compiled"].first_call is not None:
        compiled = by["compiled"]
        print(f"\ncompiled: first call {compiled.first_call:.1f} s, i.e. about "
              f"{compiled.first_call - compiled.best:.1f} s of compilation")  # fmt: skip
    return by


def check_goals(by: dict[str, Row], overhead: float | None) -> None:
    print("\nGoals (issue 12):")

    def goal(text: str, value: float | None, limit: float, below: bool = True) -> None:
        if value is None:
            print(f"  [ -- ] {text}: not measured")
            return
        met = value <= limit if below else value < limit
        print(f"  [{'met ' if met else 'MISS'}] {text}: {value:.3f} (goal {'<=' if below else '<'} {limit})")

    def r(a: str, b: str, what: str) -> float | None:
        if a not in by or b not in by:
            return None
        x, y = getattr(by[a], what), getattr(by[b], what)
        return None if x is None or y is None else x / y

    goal("default FLOPs / bare", r("default", "bare", "flops"), 1.22)
    goal("default time / bare", r("default", "bare", "best"), 1.22)
    goal("ckpt activation memory / default", r("ckpt", "default", "saved_bytes"), 0.35)
    goal("ckpt time / default", r("ckpt", "default", "best"), 1.35)
    goal("ckpt time / a1111-style time", r("ckpt", "a1111", "best"), 1.0, below=False)
    goal("Lightning step / hand-written loop (tiny model)", overhead, 1.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per row, interleaved")
    ap.add_argument("--small", action="store_true", help="narrow UNet (SD1.5 layout, 768 context): quick run")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--loop", action="store_true", help="also Lightning's step vs a hand-written loop")
    args = ap.parse_args()
    if "bare" not in args.rows:
        ap.error("--rows: bare is the baseline every ratio needs")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    start = time.perf_counter()
    unet = build_unet(args.small, device, dtype)
    widths = unet_attention_widths(unet)
    hn = Hypernetwork(
        HypernetworkConfig(layer_structure=[1, 2, 1], activation="swish"), sizes=widths["cross"] + widths["self"]
    ).to(device)
    hn.train()
    rows = build_rows(unet, hn, args.rows)
    batch = make_batch(args.batch, args.resolution, device, dtype)
    params = sum(p.numel() for p in unet.parameters())
    print(f"UNet {params / 1e6:.0f} M parameters ({'small' if args.small else 'SD1.5'}), hypernetwork "
          f"{hn.parameter_count() / 1e6:.1f} M, {args.resolution} px, batch {args.batch}, {device}, {args.dtype}; "
          f"built in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    for row in rows:  # warm-up; the compiled row compiles here
        row.first_call = timed(row, hn, batch, device, dtype)
        print(f"  warm-up {row.name}: {row.first_call:.1f} s", flush=True)
    for repeat in range(args.repeats):
        for row in rows:
            row.seconds.append(timed(row, hn, batch, device, dtype))
        print(f"  repeat {repeat + 1}: " + ", ".join(f"{r.name} {r.seconds[-1]:.1f} s" for r in rows), flush=True)
    for row in rows:
        if row.name != "compiled":  # same ops as default; flop counting and saved-tensor hooks are eager-only
            row.flops = count_flops(lambda row=row: step(row, hn, batch, device, dtype))
            row.saved_bytes = saved_bytes(row, hn, batch, device, dtype)
            print(f"  counted {row.name}: {row.flops / 1e9:.1f} GFLOP, {row.saved_bytes / 2**20:.0f} MiB", flush=True)
    limit = None
    if "default" in {r.name for r in rows}:
        default = next(r for r in rows if r.name == "default")
        limit = rows[0].flops + hypernetwork_own_flops(default, hn, batch, device, dtype)
    by = report(rows, limit)
    overhead = None
    if args.loop:
        from lightning_loop import loop_overhead  # noqa: PLC0415 - needs Lightning and the task; only on request

        overhead = loop_overhead()
    check_goals(by, overhead)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
