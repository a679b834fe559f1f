"""Does `train.learning_rate=auto` match or beat the fixed defaults? The same run twice: the configured rate, then auto.

    python benchmarks/lr_auto.py [--data sample grade] [--threads 2] [-- extra overrides]

For each data set, `python train.py` runs with the config's own rate and then with `train.learning_rate=auto`
(same seed, steps and everything else), and the script prints the rate used, val/loss at step 0 and at the end
(the fixed (timestep, noise) pairs of callbacks/validation.py), the wall time and the sweep's own time. Data sets:
`sample` is datasets/sample with its recipe; `grade` is a folder made here, a style that is not in the repository
(the base's plain shapes under a warm sepia colour grade, captioned by content), trained with the plain folder
command of issue #26. Style shares for the sample: score each run's file with
`python benchmarks/learning_proof.py --hypernetwork FILE`.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from hyperlit.demo.shapes import BACKGROUNDS, COLOURS, SHAPES, draw, random_scene

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)\]")
SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])


def make_grade_folder(folder: Path, count: int = 16, seed: int = 0) -> Path:
    """The base's plain shapes under a sepia colour grade (the classic sepia matrix), captioned by content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for k in range(count):
        scene = random_scene(rng, rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)))
        rgb = np.asarray(draw(scene, (64, 64), rng=rng), dtype=np.float64)
        graded = np.clip(rgb @ SEPIA.T, 0, 255).astype(np.uint8)
        Image.fromarray(graded).save(folder / f"{k:02d}.png")
        (folder / f"{k:02d}.txt").write_text(scene.caption)
    return folder


@dataclass
class Outcome:
    rate: str
    start: float
    end: float
    seconds: float
    sweep_seconds: float | None


def run(out: Path, overrides: list[str], threads: int) -> Outcome:
    cmd = [sys.executable, str(REPO / "train.py"), "logger=none", f"hydra.run.dir={out}", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        sys.exit(f"training failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    text = (out / "train.log").read_text()
    final = re.search(r"validation: val/loss ([\d.e-]+) after \d+ steps \(step 0: ([\d.e-]+)\)", text)
    assert final, text[-2000:]
    auto = re.search(r"train\.learning_rate=auto: ([\d.e-]+) ", text)
    rate = auto[1] if auto else str(OmegaConf.load(out / ".hydra" / "config.yaml").train.learning_rate)
    sweep = None
    if auto:  # from the data module's last line to the sweep's line
        lines = text.splitlines()
        data_line = max(i for i, line in enumerate(lines) if "hyperlit.data.datamodule" in line)
        sweep_line = next(i for i, line in enumerate(lines) if "train.learning_rate=auto:" in line)
        sweep = (_time(lines[sweep_line]) - _time(lines[data_line])).total_seconds()
    return Outcome(rate, float(final[2]), float(final[1]), seconds, sweep)


def _time(line: str) -> datetime:
    found = STAMP.match(line)
    assert found, line
    return datetime.strptime(f"{found[1]}.{found[2]}", "%Y-%m-%d %H:%M:%S.%f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["sample", "grade"], choices=["sample", "grade"])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp())
    quiet = ["callbacks.preview.every=0", "callbacks.preview.at_end=false", *args.overrides]
    print(f"{'data':<8} {'rate':<18} {'val/loss step 0':>15} {'end':>8} {'wall s':>7} {'sweep s':>8}")
    for name in args.data:
        data = [] if name == "sample" else ["data=folder", f"data.path={make_grade_folder(root / 'grade')}",
                                             "data.resolution=64", "data.batch_size=4"]  # fmt: skip
        for label, extra in (("fixed", []), ("auto", ["train.learning_rate=auto"])):
            outcome = run(root / f"{name}-{label}", [*data, *quiet, *extra], args.threads)
            sweep = f"{outcome.sweep_seconds:8.0f}" if outcome.sweep_seconds is not None else f"{'-':>8}"
            rate = f"{outcome.rate} ({label})"
            print(f"{name:<8} {rate:<18} {outcome.start:>15.4f} {outcome.end:>8.4f} {outcome.seconds:>7.0f} {sweep}")
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
