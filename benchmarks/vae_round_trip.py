"""Calibrates the data check's warning level: the round-trip PSNR of kinds of images through the tiny base's VAE.

    python benchmarks/vae_round_trip.py [--count 32]

Images the VAE was made for (datasets/sample, plain shapes of the base's world) against images it cannot hold (an
orange gradient with black outlines, fine noise, text-like line work), all 64 px, scored as the training check
scores them (hyperlit.callbacks.vae_check: posterior mean decoded, PSNR on 8-bit images). The tiny base's level,
`ModelFamily.vae_warn_psnr`, lies between the two groups (docs/benchmarks.md "VAE round-trip check").
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hyperlit.callbacks.vae_check import round_trip_psnr
from hyperlit.data.images import IMAGE_EXTENSIONS
from hyperlit.demo.shapes import BACKGROUNDS, COLOURS, SHAPES, draw, random_scene
from hyperlit.models import load_components
from hyperlit.models.family import get_family

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample"
SIZE = 64


def plain(rng: random.Random) -> Image.Image:
    scene = random_scene(rng, rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)))
    return draw(scene, (SIZE, SIZE), rng=rng)


def orange_outlined(rng: random.Random) -> Image.Image:
    """The issue's case: an orange gradient background, the shape outlined in black."""
    x = np.linspace(0, 1, SIZE)[None, :, None]
    y = np.linspace(0, 1, SIZE)[:, None, None]
    t = (x + y) / 2
    bg = (1 - t) * np.array([255, 214, 120]) + t * np.array([214, 84, 0])
    img = Image.fromarray(np.broadcast_to(bg, (SIZE, SIZE, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r, cx, cy = rng.uniform(10, 20), rng.uniform(22, 42), rng.uniform(22, 42)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[rng.choice(list(COLOURS))], outline=(0, 0, 0), width=3)
    return img


def fine_noise(rng: random.Random) -> Image.Image:
    """A plain shape under per-pixel noise of +-60 grey levels (film grain far finer than a latent cell)."""
    base = np.asarray(plain(rng), dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).uniform(-60, 60, base.shape[:2])[..., None]
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def line_work(rng: random.Random) -> Image.Image:
    """Text-like line work: rows of short 1 px strokes and glyphs, black on white."""
    img = Image.new("RGB", (SIZE, SIZE), (245, 245, 245))
    d = ImageDraw.Draw(img)
    for row in range(4, SIZE - 6, 8):
        d.text((2, row - 2), "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(12)), fill=(0, 0, 0))
    return img


def sample_images() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(SAMPLE.iterdir()) if p.suffix in IMAGE_EXTENSIONS]


def to_pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def score(components, images: list[Image.Image]) -> torch.Tensor:
    pixels = torch.stack([to_pixels(i) for i in images])
    mean, _ = components.encode_images(pixels)
    return round_trip_psnr(components, mean, pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=32, help="images per generated kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    components = load_components(family="tiny")
    kinds: dict[str, Callable[[random.Random], Image.Image] | None] = {
        "datasets/sample": None,
        "plain base shapes": plain,
        "orange gradient, black outlines": orange_outlined,
        "fine noise (+-60)": fine_noise,
        "text-like line work": line_work,
    }
    level = get_family("tiny").vae_warn_psnr
    print(f"tiny base VAE, {SIZE} px; the warning level (ModelFamily.vae_warn_psnr) is {level:g} dB")
    print(f"{'images':<34} {'n':>3} {'mean dB':>8} {'worst':>6} {'best':>6}  warns")
    for name, make in kinds.items():
        rng = random.Random(args.seed)
        images = sample_images() if make is None else [make(rng) for _ in range(args.count)]
        db = score(components, images)
        mean = float(db.mean())
        print(
            f"{name:<34} {len(images):>3} {mean:>8.1f} {float(db.min()):>6.1f} {float(db.max()):>6.1f}  {mean < level}"
        )


if __name__ == "__main__":
    main()
