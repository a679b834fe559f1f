"""Draw the embedded sample dataset (datasets/sample): small procedural images with A1111-style captions.

Deterministic: running it again rewrites the same files. Most images have a same-stem .txt caption; the last
one has none, so its caption comes from the file name (A1111 strips the leading number).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "purple": (130, 50, 160),
    "orange": (240, 130, 30),
}
BACKGROUNDS = {"white": (245, 245, 240), "black": (15, 15, 20), "grey": (128, 128, 128), "sky": (150, 200, 240)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: str, background: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.25, 0.38)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    for _ in range(rng.randint(2, 5)):  # a little texture so the images are not trivially flat
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=tuple(min(255, c + 40) for c in BACKGROUNDS[background]))
    return img


def make_sample(out: Path, count: int = 12, seed: int = 1234) -> list[Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (96, 96), (128, 128), (96, 64), (64, 96)]
    written = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[i % len(COLOURS)]
        background = list(BACKGROUNDS)[(i // 2) % len(BACKGROUNDS)]
        size = sizes[i % len(sizes)]
        img = draw(shape, colour, background, size, rng)
        stem = f"{i + 1:02d}-{colour} {shape}"
        path = out / f"{stem}.png"
        img.save(path, optimize=True)
        written.append(path)
        if i < count - 1:
            caption = f"{colour} {shape}, {background} background, simple shape, flat colours"
            (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    paths = make_sample(args.out, args.count, args.seed)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
