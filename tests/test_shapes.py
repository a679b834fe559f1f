"""The demo's shape judge on its own clean renders: colour, shape and style are named correctly."""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers.paths import REPO_ROOT, SAMPLE_DIR
from helpers.scripts import load_script
from PIL import Image, ImageFilter

from hyperlit.demo.shapes import (
    BACKGROUNDS,
    CHECKER_CELL,
    CHECKER_DARK,
    COLOURS,
    HELD_OUT,
    SAMPLE_CHECKER_DARK,
    SHAPES,
    STYLE_SCORE,
    Scene,
    caption,
    draw,
    judge,
    random_scene,
    train_combos,
)


def renders(n: int, seed: int, checker_share: float) -> list[tuple[Scene, bool, Image.Image]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        checker = background == "white" and rng.random() < checker_share
        scene = random_scene(rng, colour, shape, background)
        out.append((scene, checker, draw(scene, checker=checker, jitter=12, rng=rng)))
    return out


def test_judge_names_colour_and_shape_of_every_clean_render():
    cases = renders(300, seed=7, checker_share=0.5)
    wrong = [(s, judge(im)) for s, _, im in cases if not judge(im).matches(s.colour, s.shape)]
    assert not wrong, wrong[:3]
    # every colour, shape and background was exercised, with and without the style
    assert {s.colour for s, _, _ in cases} == set(COLOURS) and {s.shape for s, _, _ in cases} == set(SHAPES)
    assert {s.background for s, _, _ in cases} == set(BACKGROUNDS) and {c for _, c, _ in cases} == {True, False}


def test_judge_sees_the_checkered_style_and_only_it():
    cases = renders(200, seed=8, checker_share=0.5)
    assert all(judge(im).checker == checker for _, checker, im in cases)
    # a shifted checker (a generation rarely lands on the exact phase) still counts; a plain one does not
    arr = np.asarray(draw(Scene("red", "circle", "white", 0.5, 0.5, 0.2), checker=True))
    shifted = np.roll(arr, (4, 4), axis=(0, 1))
    assert judge(Image.fromarray(shifted)).checker
    assert not judge(draw(Scene("red", "circle", "white", 0.5, 0.5, 0.2))).checker


def test_judge_reports_no_shape_on_an_empty_image_and_rejects_wrong_answers():
    empty = judge(Image.new("RGB", (64, 64), BACKGROUNDS["white"]))
    assert empty.colour is None and empty.shape is None and not empty.checker
    v = judge(draw(Scene("blue", "triangle", "black", 0.5, 0.5, 0.3)))
    assert v.matches("blue", "triangle") and not v.matches("blue", "square") and not v.matches("red", "triangle")


def test_judge_accepts_larger_images_and_arrays():
    scene = Scene("green", "cross", "grey", 0.4, 0.6, 0.25)
    assert judge(draw(scene, size=(128, 128))).matches("green", "cross")
    assert judge(np.asarray(draw(scene), dtype=np.float64) / 255).matches("green", "cross")


def test_held_out_combinations_are_not_trained_and_cover_every_shape():
    train = train_combos()
    assert len(train) + len(HELD_OUT) == len(COLOURS) * len(SHAPES)
    assert not set(train) & set(HELD_OUT)
    assert {s for _, s in HELD_OUT} == set(SHAPES)  # every shape word is still trained with other colours


def test_drawing_is_deterministic_and_captions_name_the_content():
    a = draw(random_scene(random.Random(3), "purple", "square", "grey"), jitter=10, rng=random.Random(1))
    b = draw(random_scene(random.Random(3), "purple", "square", "grey"), jitter=10, rng=random.Random(1))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert caption("purple", "square", "grey") == "a purple square on a grey background"
    with pytest.raises(ValueError, match="shape='star' is not allowed"):
        draw(Scene("red", "star", "white", 0.5, 0.5, 0.2))


def test_style_line_separates_noisy_plain_backgrounds_from_faint_partial_checkers():
    """Generations are soft and noisy: noise or a smooth shading on a plain background is not the style, while a
    low-contrast checker with cells missing and blurred edges still is (what a half-learned style looks like)."""
    rng = np.random.default_rng(0)
    scene = Scene("blue", "square", "white", 0.5, 0.5, 0.2)
    plain = np.asarray(draw(scene), dtype=np.float64)
    yy, xx = np.mgrid[0:64, 0:64]
    for _ in range(20):
        noisy = plain + rng.normal(0, 6, plain.shape)  # grain
        shaded = plain - 0.4 * (xx + yy)[..., None]  # a smooth vignette-like shading, 0..50 grey levels
        for arr in (noisy, shaded):
            assert judge(np.clip(arr, 0, 255) / 255).checker_score < STYLE_SCORE / 2
    cells = ((yy // CHECKER_CELL + xx // CHECKER_CELL) % 2).astype(bool)
    for _ in range(20):
        keep = rng.random((4, 4)) < 0.75  # a quarter of the dark cells missing
        dark = cells & keep[yy // CHECKER_CELL, xx // CHECKER_CELL]
        faint = plain - 25.0 * dark[..., None] + rng.normal(0, 4, plain.shape)  # a third of the drawn contrast
        img = Image.fromarray(np.clip(faint, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
        assert judge(img).checker, judge(img).checker_score


def test_the_committed_sample_set_is_what_make_sample_draws(tmp_path):
    """datasets/sample is regenerated whenever the drawing or its grey changes (and nothing else is in it)."""
    make_sample = load_script(REPO_ROOT / "datasets" / "make_sample.py").make_sample
    make_sample(tmp_path)
    drawn = sorted(p.name for p in tmp_path.iterdir())
    assert drawn == sorted(p.name for p in SAMPLE_DIR.iterdir()) and len(drawn) == 31  # 16 images, 15 captions
    for name in drawn:
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(Image.open(SAMPLE_DIR / name)))
        else:
            assert (tmp_path / name).read_text() == (SAMPLE_DIR / name).read_text(), name


def test_the_sample_sets_checker_uses_its_own_lighter_grey_and_make_base_keeps_its_own():
    scene = Scene("red", "circle", "white", 0.8, 0.8, 0.16)  # the top-left cells are background
    sample = np.asarray(draw(scene, checker=True, dark=SAMPLE_CHECKER_DARK))
    base = np.asarray(draw(scene, checker=True))  # make_base.py's autoencoder checkers and stripes
    # cell (0, 1) is dark, cell (0, 0) light (white)
    assert (
        tuple(sample[4, CHECKER_CELL + 4]) == SAMPLE_CHECKER_DARK and tuple(base[4, CHECKER_CELL + 4]) == CHECKER_DARK
    )
    assert tuple(sample[4, 4]) == tuple(base[4, 4]) == BACKGROUNDS["white"]
    assert judge(Image.fromarray(sample)).checker and judge(Image.fromarray(base)).checker
    # and the committed images carry it: a fifth or more of their pixels (cell interiors), never make_base's grey
    for path in sorted(SAMPLE_DIR.glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        assert (pixels == SAMPLE_CHECKER_DARK).all(1).mean() > 0.2, path
        assert not (pixels == CHECKER_DARK).all(1).any(), path
