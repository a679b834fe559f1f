"""Training throughput with 2 DDP processes (CPU, gloo) against 1 process, on the tiny model.

    python benchmarks/ddp_scaling.py [--steps 30] [--batch-size 2] [--threads 1]

Runs `train.py` twice in subprocesses with the same per-process batch: `trainer=default` and
`trainer=ddp_cpu trainer.devices=2`. Samples/s is what the task logs as `train/samples_per_s` (batch x world size
over the wall time between consecutive steps), read from the CSV log; the median over the steps after the first
few (warm-up) is reported, so start-up and process launch are excluded. On a shared 2-core machine the ratio is
informational: two processes compete for the cores that one process would otherwise have to itself.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, steps: int, batch_size: int, threads: int, trainer: list[str]) -> tuple[float, float]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("LOCAL_RANK", None)
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *trainer,
        "hypernet=swish_121",
        "logger=csv",
        f"train.max_steps={steps}",
        f"data.batch_size={batch_size}",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={out}",
        f"data.cache_dir={out.parent / 'cache'}",
        "callbacks.preview.every=0",
        "callbacks.preview.at_end=false",
        "callbacks.export.save_every=0",
        "~callbacks.progress",
        "trainer.enable_progress_bar=false",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(trainer)} failed:\n{result.stderr[-3000:]}")
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rates = [float(row["train/samples_per_s"]) for row in csv.DictReader(f) if row.get("train/samples_per_s")]
    warm = rates[min(3, len(rates) - 1) :]
    return statistics.median(warm), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one, wall_one = run(
            root / "one", args.steps, args.batch_size, args.threads, ["trainer=default", "trainer.accelerator=cpu"]
        )
        two, wall_two = run(
            root / "two", args.steps, args.batch_size, args.threads, ["trainer=ddp_cpu", "trainer.devices=2"]
        )
    print(
        f"tiny model, {args.steps} steps, batch {args.batch_size} per process, OMP_NUM_THREADS={args.threads}, "
        f"{os.cpu_count()} cores"
    )
    print(f"  1 process   : {one:8.1f} samples/s  (whole run {wall_one:5.1f} s)")
    print(f"  2 processes : {two:8.1f} samples/s  (whole run {wall_two:5.1f} s)")
    print(f"  ratio 2/1   : {two / one:8.2f}x  (ideal 2.00x with a free core per process)")


if __name__ == "__main__":
    main()
