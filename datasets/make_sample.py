"""Draw the embedded sample dataset (datasets/sample): coloured shapes in a style the tiny base does not know.

The style is a light checkerboard background (hyperlit.demo.shapes.CHECKER_CELL, SAMPLE_CHECKER_DARK); the base
model only ever drew plain and striped backgrounds. Captions describe the content only (`a red circle on a white
background`), so a hypernetwork trained on the set must learn the style itself. Each training colour x shape
combination of the base appears once, at a random size and position; the held-out combinations stay unseen for the
learning proof.

Deterministic: running it again rewrites the same files. Every image but the last has a same-stem .txt caption;
the last has none, so its caption comes from its file name (A1111 strips the leading number).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from hyperlit.demo.shapes import SAMPLE_CHECKER_DARK, draw, random_scene, train_combos


def make_sample(out: Path, seed: int = 1234) -> list[Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.png"), *out.glob("*.txt")]:  # a rerun leaves exactly this set
        old.unlink()
    combos = train_combos()
    written = []
    for i, (colour, shape) in enumerate(combos):
        scene = random_scene(rng, colour, shape, "white")
        img = draw(scene, checker=True, dark=SAMPLE_CHECKER_DARK)
        last = i == len(combos) - 1
        stem = f"{i + 1:02d}-{scene.caption}" if last else f"{i + 1:02d}-{colour} {shape}"
        path = out / f"{stem}.png"
        img.save(path, optimize=True)
        written.append(path)
        if not last:
            (out / f"{stem}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    paths = make_sample(args.out, args.seed)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
