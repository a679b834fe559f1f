"""How well does the tiny base draw what it is asked? Colour and shape adherence per the shapes judge.

    python benchmarks/base_quality.py [--folder hyperlit/models/tiny_base] [--seeds 8] [--sheet out.png]

Two prompt sets, fixed seeds, one image per (prompt, seed): the colour x shape combinations held out of the
base's training (hyperlit.demo.shapes.HELD_OUT, on each background), and the trained combinations at seeds the
training never used (sampling noise is not training data, so every seed is held out). The baseline is the same
judge on clean renders of the same prompts (1.00 by tests/test_shapes.py). Goal: held-out adherence >= 0.8.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hyperlit.demo.quality import Target, generate, grid, load_pipeline, score
from hyperlit.demo.shapes import BACKGROUNDS, HELD_OUT, train_combos
from hyperlit.models.loader import TINY_BASE_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=TINY_BASE_DIR, help="a diffusers folder")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (DPM++ 2M)")
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--sheet", type=Path, help="write the held-out generations as one PNG here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.folder)
    sets = {
        "held-out combinations": [Target(c, s, b) for c, s in HELD_OUT for b in BACKGROUNDS],
        "trained combinations, new seeds": [Target(c, s, "white") for c, s in train_combos()],
    }
    print(f"{args.folder}: {args.steps} DPM++ 2M steps, CFG {args.cfg}, {args.seeds} seeds per prompt")
    print(f"{'prompts':<32} {'samples':>7} {'adherence':>9} {'colour':>6} {'shape':>5} {'style':>5}")
    for name, prompts in sets.items():
        targets = [t for t in prompts for _ in range(args.seeds)]
        seeds = [i for _ in prompts for i in range(args.seeds)]
        images = generate(pipe, [t.prompt for t in targets], seeds, steps=args.steps, cfg=args.cfg)
        s = score(images, targets)
        print(f"{name:<32} {s.samples:>7} {s.adherence:>9.2f} {s.colour:>6.2f} {s.shape:>5.2f} {s.style:>5.2f}")
        if args.sheet is not None and name.startswith("held-out"):
            grid(images, columns=args.seeds * len(BACKGROUNDS)).save(args.sheet)


if __name__ == "__main__":
    main()
