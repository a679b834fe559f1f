"""``taesd.extra_scenes``: procedural scenes in the tiny base's image domain, drawn fresh for every training step.

Distillation needs images the teacher VAE knows, not the user's images: the teacher labels any image exactly. The
tiny base's VAE learned scenes drawn by ``hyperlit.demo.shapes`` (datasets/make_base.py), so an unlimited supply of
distinct in-domain images exists, and a student that sees new ones every step learns the teacher's function instead
of memorising a 13-image folder. A share of the scenes (``taesd.scene_sample_look``) has the sample set's look
(datasets/make_sample.py: a light checkerboard), the rest the base's (plain, striped or checkered backgrounds, colours
jittered as its autoencoder saw them). Any colour goes with any shape: the held-out combinations are the UNet's,
not the autoencoder's.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

from hyperlit.demo.shapes import BACKGROUNDS, COLOURS, SAMPLE_CHECKER_DARK, SHAPES, STRIPED, draw, random_scene

# the base autoencoder's draws (datasets/make_base.py codec_image): a third-ish checkered, colours jittered by 25
BASE_CHECKER_SHARE = 0.35
BASE_JITTER = 25
BASE_BACKGROUNDS = (*BACKGROUNDS, STRIPED)  # the UNet's images added striped backgrounds


def draw_scene(rng: random.Random, height: int, width: int, sample_look: float) -> np.ndarray:
    """One scene as a (height, width, 3) uint8 array: the sample set's look with probability ``sample_look``,
    else the base's."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if rng.random() < sample_look:  # the sample set's look: white with the light checkerboard, exact palette colours
        image = draw(random_scene(rng, colour, shape, "white"), (width, height), checker=True, dark=SAMPLE_CHECKER_DARK)
    else:
        scene = random_scene(rng, colour, shape, rng.choice(BASE_BACKGROUNDS))
        image = draw(scene, (width, height), checker=rng.random() < BASE_CHECKER_SHARE, jitter=BASE_JITTER, rng=rng)
    return np.asarray(image, dtype=np.uint8)


def scene_batch(count: int, height: int, width: int, seed: int, sample_look: float) -> Tensor:
    """``count`` scenes as a (count, 3, height, width) float32 batch in [-1, 1], the data loader's range; the same
    seed draws the same scenes (python's ``random``, no global state)."""
    rng = random.Random(seed)
    arr = np.stack([draw_scene(rng, height, width, sample_look) for _ in range(count)]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0).contiguous()
