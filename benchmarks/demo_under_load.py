"""The demo's wall time at 1 and 2 intra-op threads, on an idle machine and next to processes that keep every core busy.

    python benchmarks/demo_under_load.py [--steps 100] [--threads 1 2] [--timeout 900]

Runs `python train.py hypernet=swish_121 train.max_steps=STEPS cpu_threads=N` (the README's first command, shorter)
in a subprocess, once per thread count with nothing else started, and once per thread count next to one
`python -c 'while 1: pass'` per core. Each run's wall time covers everything a user waits for: start-up, the
step-0 and final preview grids, training, exports. It also prints the median training rate (samples/s, from the
run's metrics) and the time of the final preview, read from the run's log. The ratios compare runs of this
invocation only (the machine is shared: absolute times move between invocations).

Goal (issue #27): under load, the demo with the runner's default thread count finishes within 2x its idle time.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPIN = "while 1: pass"
PREVIEW_LINE = re.compile(r"preview: grid .* in ([0-9.]+) s")


@dataclass
class Timing:
    """One run: wall seconds (None: over the timeout), median samples/s, seconds of the final preview grid."""

    wall: float | None
    samples_per_s: float | None
    final_preview: float | None


def run_demo(out: Path, steps: int, threads: int, timeout: float) -> Timing:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # cpu_threads below decides
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "hypernet=swish_121",
        f"train.max_steps={steps}",
        f"cpu_threads={threads}",
        "logger=csv",
        f"hydra.run.dir={out}",
        f"data.cache_dir={out.parent / 'cache'}",
        "~callbacks.progress",
        "trainer.enable_progress_bar=false",
    ]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Timing(None, None, None)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"cpu_threads={threads} failed:\n{result.stderr[-3000:]}")
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(r["train/samples_per_s"]) for r in csv.DictReader(f) if r.get("train/samples_per_s")]
    previews = [float(m[1]) for m in PREVIEW_LINE.finditer(result.stdout + result.stderr)]
    return Timing(wall, statistics.median(rates) if rates else None, previews[-1] if previews else None)


def spinners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]


def show(label: str, timing: Timing, timeout: float) -> str:
    wall = f"{timing.wall:7.1f} s" if timing.wall is not None else f"> {timeout:.0f} s"
    rate = f"{timing.samples_per_s:6.1f} samples/s" if timing.samples_per_s else "     - samples/s"
    preview = f"final preview {timing.final_preview:6.1f} s" if timing.final_preview is not None else ""
    return f"  {label:<22} {wall:>10}  {rate}  {preview}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a is not None and b else "  n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="train.max_steps of each run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="cpu_threads values to measure")
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is stopped and reported as >")
    args = parser.parse_args()
    idle: dict[int, Timing] = {}
    busy: dict[int, Timing] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_demo(root / "warm", 2, args.threads[0], args.timeout)  # fills the latent/text cache and the OS file cache
        for threads in args.threads:
            idle[threads] = run_demo(root / f"idle{threads}", args.steps, threads, args.timeout)
        load = spinners(args.load)
        try:
            for threads in args.threads:
                busy[threads] = run_demo(root / f"busy{threads}", args.steps, threads, args.timeout)
        finally:
            for process in load:
                process.kill()
                process.wait()
    print(
        f"demo (hypernet=swish_121, {args.steps} steps, step-0 and final preview grids), {os.cpu_count()} cores, "
        f"load: {args.load} x `python -c '{SPIN}'`"
    )
    for threads in args.threads:
        print(show(f"{threads} thread(s), idle", idle[threads], args.timeout))
        print(show(f"{threads} thread(s), busy", busy[threads], args.timeout))
    for threads in args.threads:
        print(f"  busy / idle at {threads} thread(s): {ratio(busy[threads].wall, idle[threads].wall)}  (goal <= 2x)")
    best_idle = min((t.wall for t in idle.values() if t.wall is not None), default=None)
    for threads in args.threads:
        print(f"  busy at {threads} thread(s) / best idle: {ratio(busy[threads].wall, best_idle)}")


if __name__ == "__main__":
    main()
