"""`taesd.extra_scenes`: procedural scenes of the tiny base's domain appended to each training batch, new every step
from (seed, step), in the sample set's look and the base's; the held-out images are never among them, and the
teacher labels them beside the data set's images."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.paths import REPO_ROOT

from hyperlit.data.pixeldatamodule import PixelDataModule
from hyperlit.demo.shapes import COLOURS, SHAPES, judge
from hyperlit.tasks.taesd.module import TAESDTask
from hyperlit.tasks.taesd.scenes import scene_batch
from hyperlit.vae.config import PerceptualConfig, PosteriorConfig
from hyperlit.vae.taesd_config import DecoderLossConfig, DistillConfig, TAESDDiscConfig, TAESDTaskConfig

SAMPLE = REPO_ROOT / "datasets" / "sample"
SAMPLE_GREYS = {(245, 245, 245), (190, 190, 190)}  # the sample set's white and its checker's dark cells


def as_uint8(batch: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] back to (N, H, W, 3) uint8; exact for images that came from uint8."""
    return ((batch + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def task(extra_scenes: int, augment: bool = False) -> TAESDTask:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
    )  # fmt: skip
    cfg = TAESDTaskConfig(
        max_steps=1,
        taesd=DistillConfig(extra_scenes=extra_scenes, augment=augment),
        loss=DecoderLossConfig(perceptual=PerceptualConfig(weight=0.0)),
        disc=TAESDDiscConfig(ndf=8, n_layers=2, warmup_steps=0, ramp_steps=0),
        posterior=PosteriorConfig(cache=False, sample=True),
    )
    return TAESDTask(vae, cfg, seed=5)


def sample_split() -> PixelDataModule:
    """datasets/sample split as conf/taesd_model/tiny.yaml splits it (64 px, 3 held out, seed 42)."""
    dm = PixelDataModule(str(SAMPLE), resolution=64, batch_size=2, val_count=3, fixed_crops=False, seed=42,
                         random_crop=False, num_workers=0)  # fmt: skip
    dm.setup()
    return dm


def all_pixels(split) -> torch.Tensor:
    """Every image of a split (ImageCrops: one item per file)."""
    return torch.stack([split[i]["pixels"] for i in range(len(split.files))])


def test_scenes_repeat_for_a_seed_and_differ_across_seeds() -> None:
    a = scene_batch(6, 64, 64, seed=11, sample_look=0.5)
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, scene_batch(6, 64, 64, seed=11, sample_look=0.5))
    b = scene_batch(6, 64, 64, seed=12, sample_look=0.5)
    assert all(not torch.equal(a[i], b[j]) for i in range(6) for j in range(6))
    assert all(not torch.equal(a[i], a[j]) for i in range(6) for j in range(i + 1, 6))
    wide = scene_batch(2, 48, 80, seed=1, sample_look=0.5)  # any crop shape the loader hands over
    assert wide.shape == (2, 3, 48, 80)


def test_scenes_are_shapes_of_the_palette_in_both_looks() -> None:
    """The shape judge (hand-written geometry and hue) finds a palette colour and a shape in every scene; all colours
    and shapes occur; about half have exactly the sample set's background greys, the rest the base's."""
    images = as_uint8(scene_batch(240, 64, 64, seed=3, sample_look=0.5))
    verdicts = [judge(im / 255.0) for im in images]
    assert all(v.colour is not None and v.shape is not None for v in verdicts)
    assert {v.colour for v in verdicts} == set(COLOURS) and {v.shape for v in verdicts} == set(SHAPES)
    sample_look = [set(map(tuple, im[:4, :4].reshape(-1, 3))) <= SAMPLE_GREYS for im in images]
    assert 0.35 < np.mean(sample_look) < 0.65
    assert np.mean([v.checker for v, s in zip(verdicts, sample_look, strict=True) if s]) > 0.9  # the checkered style
    corner = images[:, :4, :4].reshape(len(images), -1, 3)
    assert len({tuple(c[0]) for c, s in zip(corner, sample_look, strict=True) if not s}) > 20  # jittered backgrounds


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_share_of_the_sample_sets_look_is_what_is_asked(share) -> None:
    images = as_uint8(scene_batch(60, 64, 64, seed=9, sample_look=share))
    sample_look = [set(map(tuple, im[:4, :4].reshape(-1, 3))) <= SAMPLE_GREYS for im in images]
    assert np.mean(sample_look) == share


def test_the_held_out_images_are_never_drawn() -> None:
    """Over many training steps, no scene equals (or nearly equals) a held-out image of the sample set, nor a
    training image: the scenes are new images, and validation stays the data set's held-out images."""
    dm = sample_split()
    held_out, training = all_pixels(dm.val_set), all_pixels(dm.train_set)
    assert len(held_out) == 3 and len(training) == 13
    t = task(extra_scenes=4)
    drawn = []
    for step in range(60):
        t.step = step
        drawn.append(t.with_scenes(training[:1])[1:])
    scenes = torch.cat(drawn)
    assert len(scenes) == 240
    distance = (scenes[:, None] - torch.cat([held_out, training])[None]).abs().flatten(2).mean(-1)
    assert distance.min() > 0.02  # mean absolute difference on [-1, 1]: never the same picture


def test_with_scenes_appends_new_scenes_each_step_and_repeats_on_resume() -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = task(extra_scenes=3)
    t.step = 4
    out = t.with_scenes(x)
    assert out.shape == (5, 3, 32, 32) and torch.equal(out[:2], x)
    assert torch.equal(out, t.with_scenes(x))  # (seed, step) decides: a resumed run draws the same scenes
    t.step = 5
    assert not torch.equal(out[2:], t.with_scenes(x)[2:])
    other = task(extra_scenes=3)
    other.seed, other.step = 6, 4
    assert not torch.equal(out[2:], other.with_scenes(x)[2:])
    assert torch.equal(task(extra_scenes=0).with_scenes(x), x)


@pytest.mark.parametrize("augment", [False, True])
def test_the_teacher_labels_the_scenes_beside_the_data_sets_images(tmp_path, augment) -> None:
    """One training step on datasets/sample (batch 2) with 3 scenes: the teacher encodes 5 images, 2 of them the
    data set's training images (up to the augmentation's turns and channel orders) and 3 scenes that are none of
    them, and the student's decoder target holds all 5."""
    dm = sample_split()
    training = as_uint8(all_pixels(dm.train_set))
    t = task(extra_scenes=3, augment=augment)
    seen: dict[str, torch.Tensor] = {}
    posterior, losses = t.posterior, t.generator_losses
    t.posterior = lambda x, index=None: (seen.setdefault("teacher", x.clone()), posterior(x, index))[1]
    t.generator_losses = lambda x, mean, z: (seen.setdefault("student", x), losses(x, mean, z))[1]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(t, datamodule=dm)
    assert t.step == 1
    images = as_uint8(seen["teacher"])
    assert images.shape == (5, 64, 64, 3) and seen["student"].shape[0] == 5

    def variants(im: np.ndarray) -> list[np.ndarray]:
        turned = [np.rot90(im, k) for k in range(4)]
        return [v[..., list(p)] for v in turned + [u[:, ::-1] for u in turned] for p in
                ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))]  # fmt: skip

    def from_data_set(im: np.ndarray) -> bool:
        return any(np.array_equal(v, tr) for tr in training for v in variants(im))

    assert [from_data_set(im) for im in images] == [True, True, False, False, False]
    assert all(judge(im / 255.0).colour is not None for im in images[2:])


def test_extra_scenes_needs_a_whole_number_a_share_and_no_cache() -> None:
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"^taesd.extra_scenes: .*whole number >= 0"):
            DistillConfig(extra_scenes=bad)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"^taesd.scene_sample_look: .*share from 0 to 1"):
            DistillConfig(scene_sample_look=bad)
    with pytest.raises(ValueError, match=r"^taesd.extra_scenes: 2 .*posterior.cache=false"):
        TAESDTaskConfig(taesd=DistillConfig(extra_scenes=2), posterior=PosteriorConfig(cache=True))
