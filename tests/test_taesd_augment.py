"""`taesd.augment`: each training image becomes one of its 48 flips / quarter turns / RGB permutations (numpy's
here), drawn from (seed, step) so a resumed run sees the same images; it needs posterior.cache=false."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers.models import make_tiny_vae

from hyperlit.tasks.taesd.module import TAESDTask
from hyperlit.vae.config import PerceptualConfig, PosteriorConfig
from hyperlit.vae.taesd_config import DecoderLossConfig, DistillConfig, TAESDTaskConfig


def task(augment: bool = True) -> TAESDTask:
    cfg = TAESDTaskConfig(
        taesd=DistillConfig(augment=augment),
        loss=DecoderLossConfig(perceptual=PerceptualConfig(weight=0.0)),
        posterior=PosteriorConfig(cache=False, sample=True),
    )
    return TAESDTask(make_tiny_vae(0), cfg, seed=3)


def variants(image: np.ndarray) -> list[np.ndarray]:
    """The 48 images: 4 quarter turns x mirror or not x 6 channel orders (C x H x W)."""
    out = []
    for turns, mirror, order in itertools.product(range(4), (False, True), itertools.permutations(range(3))):
        v = np.rot90(image, turns, axes=(1, 2))
        v = v[:, :, ::-1] if mirror else v
        out.append(v[list(order)])
    return out


def index_of(found: np.ndarray, options: list[np.ndarray]) -> int:
    matches = [i for i, v in enumerate(options) if np.array_equal(found, v)]
    assert matches, "not one of the 48 variants"
    return matches[0]


def test_each_image_is_one_of_its_48_variants_and_steps_repeat() -> None:
    t = task()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = set()
    for step in range(12):
        t.step = step
        out = t.augment(x)
        assert out.shape == x.shape
        assert torch.equal(out, t.augment(x))  # (seed, step) decides: a resumed run repeats it
        for image, original in zip(out.numpy(), x.numpy(), strict=True):
            seen.add(index_of(image, variants(original)))
    assert len(seen) >= 20  # flips, turns and channel orders all occur
    assert torch.equal(task(augment=False).augment(x), x)


def test_augment_with_a_cached_posterior_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^taesd.augment: .*posterior.cache=false"):
        TAESDTaskConfig(taesd=DistillConfig(augment=True), posterior=PosteriorConfig(cache=True))
