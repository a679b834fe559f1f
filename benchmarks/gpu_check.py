"""GPU check: one prepared script for the first minutes on a GPU machine. Needs no editing; <= 8 minutes on one H100.

    python benchmarks/gpu_check.py                         # CUDA: the full check, results in outputs/gpu_check/
    python benchmarks/gpu_check.py --out $OUT              # results elsewhere
    python benchmarks/gpu_check.py --device cpu --tiny     # the same code on the CPU at toy sizes (tests run this)

What it runs, in this order (a section that would overrun --budget-s is skipped with a line saying so):
  0. the environment: torch, CUDA, cuDNN, NCCL, GPUs, bf16 support, SDPA back ends, library versions;
  1. the tiny base's default run (conf/train.yaml + the demo recipe), 300 steps, on the device in bf16-mixed and in
     fp32, each val/loss curve against the CPU fp32 run's (tolerances in TOLERANCE below);
  2. the step benchmark on an SD1.5-shaped UNet (random weights) at 512 px, bf16, batch 8: bare, default,
     checkpointing, compiled: images/s, peak memory, ratios to bare; the 60 images/s goal; SDPA restricted to the
     fused kernels (flash / memory-efficient); channels_last; compiled loss = eager loss;
  3. the same on an SDXL-shaped UNet at 1024 px, batch 2;
  4. a VAE-decoder fine-tuning step (SD-sized VAE, LPIPS + PatchGAN) at 512 px, batch 4, bf16 autocast;
  5. the tiny-autoencoder and LoRA-export paths, when this version has them (else a line saying they are absent);
  6. NCCL DDP: a 2-process torchrun of the tiny default run when there are 2+ GPUs (else skipped with a line).
It prints PASS / FAIL / SKIP per check and writes gpu_check.json and gpu_check.md to --out; exit code 1 on a FAIL.
The "expected" column is docs/benchmarks.md's "GPU check: expectations" (written before any GPU run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))  # the sibling benchmarks' helpers (hn_step, vae_step)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from hn_step import shared_weights_copy  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from hyperlit.attention import attach_hypernetworks, unet_attention_widths  # noqa: E402
from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig  # noqa: E402
from hyperlit.io import atomic_write_text  # noqa: E402
from hyperlit.models.family import FAMILIES  # noqa: E402
from hyperlit.speed import compile_unet, enable_gradient_checkpointing, use_channels_last  # noqa: E402

GOAL_SD15_IMAGES_PER_S = 60.0  # SD1.5 hypernetwork training, 512 px, cached latents, per H100 (issue 30)
# val/loss of the device runs against the CPU fp32 run. Step 0 scores the same start weights (val/loss runs outside
# autocast, in fp32; cuDNN may use TF32 convolutions): 2e-3 relative. Later steps follow another random stream (CUDA
# draws its own noise and timesteps) and bf16 gradients: on the CPU, seeds 42 and 1 of this run ended 10 % apart at
# step 300 (0.0507 / 0.0558; up to 11 % mid-curve), so the last value is held to twice that, 20 %, and the largest
# gap over the curve is reported.
TOLERANCE = {"step0": 2e-3, "final": 0.20}


@dataclass
class Check:
    section: str
    name: str
    status: str  # PASS | FAIL | SKIP | GOAL MET | GOAL MISSED | INFO
    measured: str = ""
    detail: dict = field(default_factory=dict)


@dataclass
class Settings:
    device: torch.device
    tiny: bool
    out: Path
    steps: int
    budget_s: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fmt_gib(value: float | None) -> str:
    return f"{value:.1f} GiB" if value is not None else "n/a (CPU)"


# ----------------------------------------------------------------------------------------------- 0. environment


def environment(device: torch.device) -> dict:
    import diffusers
    import lightning

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
            gpus=torch.cuda.device_count(),
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
            sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
            sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return env


# ------------------------------------------------------------------------------------ 1. tiny base's default run


def tiny_run(s: Settings, accelerator: str, precision: str, name: str) -> dict[int, float]:
    """conf/train.yaml's default run on the tiny base (with its demo recipe), `s.steps` steps; returns val/loss."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hyperlit.callbacks.validation import ValidationLoss
    from hyperlit.runner import build_run, fit

    every = max(1, s.steps // 6)
    overrides = [
        f"paths.output_dir={s.out / 'runs' / name}",
        f"data.cache_dir={s.out / 'cache'}",
        "logger=none",
        "~callbacks.progress",
        "trainer.enable_progress_bar=false",
        f"trainer.accelerator={accelerator}",
        f"trainer.precision={precision}",
        f"train.max_steps={s.steps}",
        f"callbacks.validation.every={every}",
        "callbacks.preview.every=0",  # one grid at the end: sampling on the device, without slowing the curve
        "callbacks.export.save_every=0",
        f"callbacks.checkpoint.every_n_train_steps={s.steps}",
    ]
    if s.tiny:
        overrides += ["callbacks.preview.steps=2", "callbacks.validation.timesteps=2"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run = build_run(cfg)
    fit(run, cfg)
    validation = next(cb for cb in run.trainer.callbacks if isinstance(cb, ValidationLoss))
    return dict(sorted(validation.scores.items()))


def compare_curves(curve: dict[int, float], reference: dict[int, float]) -> dict:
    steps = sorted(set(curve) & set(reference))
    gaps = {step: abs(curve[step] - reference[step]) / abs(reference[step]) for step in steps}
    first, last = steps[0], steps[-1]
    return {"steps": steps, "step0_rel": gaps[first], "final_rel": gaps[last], "max_rel": max(gaps.values())}


def check_tiny_runs(s: Settings) -> list[Check]:
    checks = []
    started = time.perf_counter()
    reference = tiny_run(s, "cpu", "32-true", "cpu-fp32")
    checks.append(
        Check(
            "1 tiny run",
            "CPU fp32 reference",
            "INFO",
            f"{time.perf_counter() - started:.0f} s",
            {"val_loss": reference},
        )
    )
    accelerator = "gpu" if s.device.type == "cuda" else "cpu"
    for precision in ("32-true", "bf16-mixed"):
        label = f"{s.device.type} {precision}"
        if s.device.type == "cpu" and precision == "32-true":
            curve = reference  # on the CPU the device's fp32 run is the reference run itself
        else:
            started = time.perf_counter()
            try:
                curve = tiny_run(s, accelerator, precision, f"{s.device.type}-{precision}")
            except Exception as err:  # a failed run is a FAIL line, and the other checks still run
                checks.append(Check("1 tiny run", label, "FAIL", f"{type(err).__name__}: {err}"[:300]))
                continue
        gaps = compare_curves(curve, reference)
        ok = gaps["step0_rel"] <= TOLERANCE["step0"] and gaps["final_rel"] <= TOLERANCE["final"]
        measured = (
            f"val/loss vs CPU fp32: step 0 {gaps['step0_rel']:.1e}, final {gaps['final_rel']:.1%}, "
            f"largest {gaps['max_rel']:.1%} (tolerance {TOLERANCE['step0']:.0e} / {TOLERANCE['final']:.0%})"
        )
        checks.append(Check("1 tiny run", label, "PASS" if ok else "FAIL", measured, {"val_loss": curve, **gaps}))
    return checks


# ----------------------------------------------------------------------------------------- 2-3. UNet step bench


@dataclass
class UNetShape:
    family: str  # hyperlit.models.family name whose unet config is used
    resolution: int
    batch: int


def unet_shapes(tiny: bool) -> dict[str, UNetShape]:
    if tiny:
        # the embedded tiny base's UNet and the tiny SDXL layout: Dynamo's capture of the compiled row takes seconds
        return {"SD1.5": UNetShape("tiny", 64, 2), "SDXL": UNetShape("tiny_sdxl", 64, 1)}
    return {"SD1.5": UNetShape("sd15", 512, 8), "SDXL": UNetShape("sdxl", 1024, 2)}


@dataclass
class UNetBatch:
    sample: Tensor
    timestep: Tensor
    context: Tensor
    added: dict  # SDXL's text_embeds / time_ids; empty for SD1.5
    target: Tensor


def make_unet_batch(unet: UNet2DConditionModel, shape: UNetShape, device: torch.device, dtype: torch.dtype):
    config = unet.config
    gen = torch.Generator().manual_seed(1)
    latent = (shape.batch, config.in_channels, shape.resolution // 8, shape.resolution // 8)
    added = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(shape.batch, pooled, generator=gen).to(device, dtype),
            "time_ids": torch.tensor(
                [[shape.resolution] * 2 + [0, 0] + [shape.resolution] * 2] * shape.batch, device=device, dtype=dtype
            ),
        }
    return UNetBatch(
        sample=torch.randn(latent, generator=gen).to(device, dtype),
        timestep=torch.randint(0, 1000, (shape.batch,), generator=gen).to(device),
        context=torch.randn(shape.batch, 77, config.cross_attention_dim, generator=gen).to(device, dtype),
        added=added,
        target=torch.randn(latent, generator=gen).to(device),
    )


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def unet_step(unet: nn.Module, hn: Hypernetwork | None, batch: UNetBatch, dtype: torch.dtype) -> Tensor:
    """Forward + backward: to the hypernetwork, or (bare) to the input. Returns the loss."""
    if hn is not None:
        hn.zero_grad(set_to_none=True)
    sample = batch.sample.detach().requires_grad_(hn is None)
    with autocast(batch.sample.device, dtype):
        kwargs = {"added_cond_kwargs": batch.added} if batch.added else {}
        out = unet(sample, batch.timestep, batch.context, **kwargs).sample
    loss = F.mse_loss(out.float(), batch.target)
    loss.backward()
    return loss.detach()


@contextlib.contextmanager
def fused_attention_only(device: torch.device) -> Iterator[str]:
    """SDPA limited to the fused kernels on CUDA (an error if the processor's call cannot use them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        yield "CPU: math kernel (fused kernels are CUDA-only)"
        return
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        yield "flash / memory-efficient only"


def build_unet(shape: UNetShape, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    config = UNet2DConditionModel.load_config(FAMILIES[shape.family].config_dir / "unet")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: an SDXL UNet initialises in seconds there
        unet = UNet2DConditionModel.from_config(config)
    unet.to(dtype=dtype).requires_grad_(False).eval()
    return unet


def timed_steps(fn: Callable[[], Tensor], device: torch.device, repeats: int) -> tuple[float, list[float], Tensor]:
    """(first call s, later calls s, last loss)."""
    synchronize(device)
    start = time.perf_counter()
    loss = fn()
    synchronize(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return first, times, loss


def check_unet(s: Settings, label: str, shape: UNetShape, compile_budget_s: float) -> list[Check]:
    section = f"{'2' if label == 'SD1.5' else '3'} {label} step"
    device, dtype = s.device, torch.bfloat16
    unet = build_unet(shape, device, dtype)
    widths = unet_attention_widths(unet)
    hn = Hypernetwork(
        HypernetworkConfig(layer_structure=[1, 2, 1], activation="swish"),
        sizes=widths["cross"] + [w for w in widths["self"] if w not in widths["cross"]],
    ).to(device)
    hn.train()
    batch = make_unet_batch(unet, shape, device, dtype)
    channels_last = use_channels_last(unet, device)
    checks = [Check(section, "channels_last", "SKIP", "CPU: hyperlit keeps the default layout")]
    if device.type == "cuda":
        conv = unet.conv_in.weight
        ok = channels_last and conv.is_contiguous(memory_format=torch.channels_last)
        checks[0] = Check(section, "channels_last", "PASS" if ok else "FAIL", f"conv weights channels_last: {ok}")
    repeats = 1 if s.tiny else 5
    results: dict[str, dict] = {}
    losses: dict[str, Tensor] = {}
    for row in ("bare", "default", "ckpt", "compiled"):
        if row == "compiled" and s.left() < compile_budget_s:
            checks.append(
                Check(
                    section,
                    row,
                    "SKIP",
                    f"{s.left():.0f} s left of the budget, compiling needs ~{compile_budget_s:.0f} s",
                )
            )
            continue
        view = unet if row == "bare" else shared_weights_copy(unet)
        if row != "bare":
            attach_hypernetworks(view, [hn])
        if row == "ckpt":
            enable_gradient_checkpointing(view)
        if row == "compiled":
            # on the CPU (the --tiny dry run) only Dynamo's capture is exercised: inductor would take minutes
            compile_unet(view, **({} if device.type == "cuda" else {"backend": "eager"}))
        reset_peak(device)
        try:
            network = None if row == "bare" else hn
            first, times, loss = timed_steps(
                lambda view=view, network=network: unet_step(view, network, batch, dtype), device, repeats
            )
        except Exception as err:
            checks.append(Check(section, row, "FAIL", f"{type(err).__name__}: {err}"[:300]))
            continue
        median = statistics.median(times)
        results[row] = {
            "images_per_s": shape.batch / median,
            "s_per_step": median,
            "first_call_s": first,
            "peak_gib": peak_gib(device),
        }
        losses[row] = loss
        hn_ok = row == "bare" or all(
            p.grad is not None and p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())
            for p in hn.parameters()
        )
        status = "PASS" if hn_ok and bool(torch.isfinite(loss)) else "FAIL"
        checks.append(
            Check(
                section,
                row,
                status,
                f"{results[row]['images_per_s']:.2f} images/s, peak "
                f"{fmt_gib(results[row]['peak_gib'])}, first call {first:.1f} s",
                results[row],
            )
        )
    bare = results.get("bare")
    if bare:
        for values in results.values():
            values["time_ratio"] = values["s_per_step"] / bare["s_per_step"]
            if values["peak_gib"] is not None and bare["peak_gib"]:
                values["memory_ratio"] = values["peak_gib"] / bare["peak_gib"]
        ratios = ", ".join(f"{row} {v['time_ratio']:.2f}x" for row, v in results.items())
        checks.append(Check(section, "time / bare", "INFO", ratios, {r: v["time_ratio"] for r, v in results.items()}))
    if "compiled" in losses and "default" in losses:
        gap = abs(float(losses["compiled"]) - float(losses["default"])) / abs(float(losses["default"]))
        checks.append(
            Check(
                section,
                "compiled loss = eager loss",
                "PASS" if gap <= 2e-2 else "FAIL",
                f"relative gap {gap:.1e} (bf16 tolerance 2e-2)",
            )
        )
    with fused_attention_only(device) as kernels:
        try:
            view = shared_weights_copy(unet)
            attach_hypernetworks(view, [hn])
            loss = unet_step(view, hn, batch, dtype)
            checks.append(Check(section, "SDPA fused kernels", "PASS" if torch.isfinite(loss) else "FAIL", kernels))
        except RuntimeError as err:
            checks.append(Check(section, "SDPA fused kernels", "FAIL", f"{kernels}: {err}"[:300]))
    if label == "SD1.5" and "default" in results:
        speed = results["default"]["images_per_s"]
        met = speed >= GOAL_SD15_IMAGES_PER_S
        if s.tiny or device.type != "cuda":
            checks.append(Check(section, "goal >= 60 images/s", "SKIP", "only at full size on a GPU"))
        else:
            checks.append(
                Check(
                    section,
                    "goal >= 60 images/s",
                    "GOAL MET" if met else "GOAL MISSED",
                    f"default row {speed:.1f} images/s",
                )
            )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return checks


# ---------------------------------------------------------------------------------------------- 4. VAE decoder


def check_vae(s: Settings) -> list[Check]:
    from vae_step import build, one_step

    section = "4 VAE decoder step"
    name, resolution, batch = ("tiny", 64, 1) if s.tiny else ("sd", 512, 4)
    task = build(name, lpips=True).to(s.device)
    opts = tuple(task.configure_optimizers())
    x = torch.rand(batch, 3, resolution, resolution, device=s.device) * 2 - 1
    index = torch.arange(batch)
    dtype = torch.bfloat16
    reset_peak(s.device)

    def step() -> Tensor:
        with autocast(s.device, dtype):
            one_step(task, opts, x, index, cached=True)
        return torch.tensor(0.0)

    try:
        first, times, _ = timed_steps(step, s.device, 1 if s.tiny else 5)
    except Exception as err:
        return [Check(section, f"{name} VAE {resolution} px", "FAIL", f"{type(err).__name__}: {err}"[:300])]
    finite = all(bool(torch.isfinite(p).all()) for p in task.vae.decoder.parameters())
    speed = batch / statistics.median(times)
    values = {"images_per_s": speed, "peak_gib": peak_gib(s.device), "first_call_s": first}
    measured = f"{speed:.2f} images/s, peak {fmt_gib(values['peak_gib'])}, batch {batch}, bf16 autocast"
    return [Check(section, f"{name} VAE {resolution} px", "PASS" if finite else "FAIL", measured, values)]


# ------------------------------------------------------------------------------------- 5. other issues' paths


def check_other_paths() -> list[Check]:
    from hyperlit.tasks import TASKS

    checks = []
    if "taesd" in TASKS:
        checks.append(
            Check(
                "5 other paths",
                "tiny autoencoder",
                "SKIP",
                "the taesd task exists; this script has no check for it yet",
            )
        )
    else:
        checks.append(Check("5 other paths", "tiny autoencoder", "SKIP", "not in this version (no taesd task)"))
    commands = _cli_commands()
    if "to-lora" in commands:
        checks.append(Check("5 other paths", "LoRA export", "SKIP", "to-lora exists; this script has no check yet"))
    else:
        checks.append(Check("5 other paths", "LoRA export", "SKIP", "not in this version (no `hyperlit to-lora`)"))
    return checks


def _cli_commands() -> set[str]:
    """The `hyperlit` console script's commands."""
    from hyperlit.cli import build_parser

    parser = build_parser()
    return {name for action in parser._subparsers._group_actions for name in action.choices}


# ------------------------------------------------------------------------------------------------ 6. NCCL DDP


def check_ddp(s: Settings) -> list[Check]:
    section = "6 NCCL DDP"
    gpus = torch.cuda.device_count() if s.device.type == "cuda" else 0
    if gpus < 2:
        return [
            Check(
                section,
                "2-process torchrun",
                "SKIP",
                f"{gpus} GPU(s): needs 2 or more (gloo DDP on the CPU is tests/test_ddp.py)",
            )
        ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # torchrun
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        "trainer=ddp",
        "trainer.devices=2",
        "train.max_steps=50",
        "logger=none",
        f"hydra.run.dir={s.out / 'runs' / 'ddp'}",
        f"data.cache_dir={s.out / 'cache'}",
        "callbacks.preview.every=0",
        "callbacks.export.save_every=0",
        "trainer.enable_progress_bar=false",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(60, int(s.left())))
    wall = time.perf_counter() - started
    exported = (s.out / "runs" / "ddp" / "hypernetworks").glob("*.pt")
    ok = result.returncode == 0 and any(exported)
    tail = "" if ok else " " + result.stderr[-300:].replace("\n", " ")
    return [Check(section, "2-process torchrun, 50 steps", "PASS" if ok else "FAIL", f"{wall:.0f} s{tail}")]


# ---------------------------------------------------------------------------------------------------- report


def section_guard(s: Settings, name: str, need_s: float, fn: Callable[[], list[Check]]) -> list[Check]:
    if s.left() < need_s:
        return [
            Check(name, "(all)", "SKIP", f"{s.left():.0f} s left of the {s.budget_s:.0f} s budget, needs ~{need_s:.0f}")
        ]
    started = time.perf_counter()
    try:
        checks = fn()
    except Exception as err:  # one broken section must not hide the others' results
        checks = [Check(name, "(all)", "FAIL", f"{type(err).__name__}: {err}"[:300])]
    print(f"  [{name}: {time.perf_counter() - started:.0f} s]", flush=True)
    for check in checks:
        print(f"  {check.status:<11} {check.section:<18} {check.name:<28} {check.measured}", flush=True)
    return checks


def markdown(env: dict, checks: list[Check], s: Settings) -> str:
    lines = [
        f"# GPU check ({'--tiny, ' if s.tiny else ''}{s.device})",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "| section | check | status | measured |",
        "|---|---|---|---|",
        *(f"| {c.section} | {c.name} | {c.status} | {c.measured.replace('|', '/')} |" for c in checks),
        "",
        f'Total {time.perf_counter() - s.started:.0f} s. Expectations: docs/benchmarks.md, "GPU check: expectations".',
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a dry run of every code path (CPU tests)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check")
    ap.add_argument("--steps", type=int, default=None, help="steps of the tiny runs (default 300; --tiny: 3)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what would run past this many seconds")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (use --device cpu --tiny for a dry run)")
    s = Settings(device, args.tiny, args.out, args.steps or (3 if args.tiny else 300), args.budget_s)
    s.out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 for the curve comparison

    env = environment(device)
    print("environment:\n" + "\n".join(f"  {k}: {v}" for k, v in env.items()), flush=True)
    shapes = unet_shapes(args.tiny)
    full = not args.tiny and device.type == "cuda"
    checks: list[Check] = []
    checks += section_guard(s, "1 tiny run", 60 if full else 0, lambda: check_tiny_runs(s))
    checks += section_guard(
        s, "2 SD1.5 step", 40 if full else 0, lambda: check_unet(s, "SD1.5", shapes["SD1.5"], 150 if full else 0)
    )
    checks += section_guard(s, "4 VAE decoder step", 30 if full else 0, lambda: check_vae(s))
    checks += section_guard(
        s, "3 SDXL step", 60 if full else 0, lambda: check_unet(s, "SDXL", shapes["SDXL"], 200 if full else 0)
    )
    checks += section_guard(s, "5 other paths", 0, check_other_paths)
    checks += section_guard(s, "6 NCCL DDP", 60 if full else 0, lambda: check_ddp(s))

    record = {"environment": env, "tiny": s.tiny, "checks": [asdict(c) for c in checks]}
    record["total_s"] = time.perf_counter() - s.started
    atomic_write_text(s.out / "gpu_check.json", json.dumps(record, indent=1, default=str))
    table = markdown(env, checks, s)
    atomic_write_text(s.out / "gpu_check.md", table)
    print("\n" + table)
    failed = [c for c in checks if c.status == "FAIL"]
    print(
        f"{len(failed)} FAIL, {sum(c.status == 'PASS' for c in checks)} PASS, "
        f"{sum(c.status == 'SKIP' for c in checks)} SKIP; results in {s.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
