"""The style suite's looks and judges (hyperlit.demo.styles): each judge calls its own renders in the style and
rejects the base's plain renders, the sample set's checker and every other style, the shapes judge still names
colour and shape, and the tiny base's autoencoder round trip keeps the styles marked as held (and erases the rest,
the suite's known limits)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from hyperlit.demo import style_judges as judges
from hyperlit.demo import style_looks as looks
from hyperlit.demo.roundtrip import psnr, round_trip
from hyperlit.demo.shapes import (
    BACKGROUNDS,
    HELD_OUT,
    SAMPLE_CHECKER_DARK,
    STRIPED,
    Scene,
    draw,
    judge,
    random_scene,
    train_combos,
)
from hyperlit.demo.styles import STYLES, VAE_ERASES, render, style_named, style_scenes, style_share, write_style_set

COUNT = 32  # renders per set: a share's step is 0.03


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return style_scenes(COUNT, seed=11)


@pytest.fixture(scope="module")
def styled(scenes: list[Scene]) -> dict[str, list[Image.Image]]:
    return {name: [render(s, style, i) for i, s in enumerate(scenes)] for name, style in STYLES.items()}


@pytest.fixture(scope="module")
def plain() -> list[Image.Image]:
    """The base's own drawing: every background it knows (plain and horizontally striped), jittered colours."""
    rng = random.Random(4)
    out = []
    for i in range(2 * COUNT):
        colour, shape = train_combos()[i % len(train_combos())]
        background = [*BACKGROUNDS, STRIPED][i % (len(BACKGROUNDS) + 1)]
        out.append(draw(random_scene(rng, colour, shape, background), jitter=12, rng=rng))
    return out


@pytest.fixture(scope="module")
def checker(scenes: list[Scene]) -> list[Image.Image]:
    """The sample set's style (datasets/sample): another style each judge must reject."""
    return [draw(s, checker=True, dark=SAMPLE_CHECKER_DARK) for s in scenes]


@pytest.fixture(scope="module")
def round_tripped(styled: dict[str, list[Image.Image]]) -> dict[str, list[Image.Image]]:
    return {name: round_trip(images) for name, images in styled.items()}


def test_the_suite_has_at_least_six_styles_of_different_kinds():
    assert len(STYLES) >= 6 and len({s.kind for s in STYLES.values()}) == len(STYLES)
    assert all(name == s.name and name.replace("_", "").isalpha() and name.islower() for name, s in STYLES.items())


@pytest.mark.parametrize("name", list(STYLES))
def test_each_judge_calls_its_own_renders_in_the_style(name, styled):
    assert style_share(STYLES[name], styled[name]) == 1.0


@pytest.mark.parametrize("name", list(STYLES))
def test_each_judge_rejects_plain_renders_the_checker_and_the_other_styles(name, styled, plain, checker):
    style = STYLES[name]
    assert style_share(style, plain) <= 0.05, [round(style.score(im), 3) for im in plain]
    assert style_share(style, checker) == 0.0
    for other, images in styled.items():
        if other != name:
            assert style_share(style, images) == 0.0, (other, [round(style.score(im), 3) for im in images])


@pytest.mark.parametrize("name", list(STYLES))
def test_each_line_sits_well_between_plain_and_styled_scores(name, styled, plain):
    """A line moved towards either side (a planted mutation of it) leaves too little room for generated images:
    the line is above the plain renders' 90th percentile and below half the style's median score."""
    style = STYLES[name]
    plain_scores = [style.score(im) for im in plain]
    styled_scores = [style.score(im) for im in styled[name]]
    assert np.percentile(plain_scores, 90) < style.line < np.median(styled_scores) / 1.5


@pytest.mark.parametrize("name", list(STYLES))
def test_the_shapes_judge_still_names_colour_and_shape_in_every_style(name, scenes, styled):
    assert all(judge(im).matches(s.colour, s.shape) for s, im in zip(scenes, styled[name], strict=True))


@pytest.mark.parametrize("name", list(STYLES))
def test_the_tiny_autoencoder_keeps_the_held_styles_and_erases_the_known_limits(name, styled, round_tripped):
    """Measured, not assumed: a style marked held is still judged in the style after the round trip; a known
    limit is not (if a new base holds it, flip `tiny_vae_holds` and the suite will say whether it is learned)."""
    style = STYLES[name]
    share = style_share(style, round_tripped[name])
    if style.tiny_vae_holds:
        assert share >= 0.9, share
        assert style.known_limit != VAE_ERASES
    else:
        assert share <= 0.1, share
        assert style.known_limit == VAE_ERASES  # the suite prints the miss as this known limit
    # the colour and shape survive the round trip either way: the prompt can still be judged
    pairs = zip(style_scenes(COUNT, seed=11), round_tripped[name], strict=True)
    kept = [judge(im).matches(s.colour, s.shape) for s, im in pairs]
    assert np.mean(kept) >= 0.6, np.mean(kept)


def test_round_trip_psnr_is_the_hand_computed_one():
    a = Image.fromarray(np.full((4, 4, 3), 100, np.uint8))
    b = Image.fromarray(np.full((4, 4, 3), 110, np.uint8))
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 100))  # every error 10: MSE 100
    assert psnr(a, a) == float("inf")


def _flat(grey: float) -> np.ndarray:
    return np.full((64, 64, 3), grey)


def test_vignette_score_is_the_darkening_from_centre_to_corner():
    """On a flat grey background (no shape) the least-squares slope is exactly the look's fall-off times the grey."""
    out = looks.vignette(_flat(0.8), np.random.default_rng(0))
    assert judges.vignette_score(out) == pytest.approx(looks.VIGNETTE * 0.8, rel=1e-6)
    assert judges.vignette_score(_flat(0.8)) == pytest.approx(0.0, abs=1e-9)


def test_grain_score_matches_the_noise_statistics():
    """1 px Gaussian noise of std s: each pixel minus its 3x3 mean has std s * sqrt(72) / 9, and the median of its
    absolute value is 0.6745 times that (the normal distribution's quartile)."""
    rng = np.random.default_rng(0)
    noisy = _flat(0.5) + rng.normal(0, 0.05, (64, 64))[..., None]
    assert judges.grain_score(noisy) == pytest.approx(0.6745 * 0.05 * np.sqrt(72) / 9, rel=0.08)


def test_warm_score_is_red_minus_blue_of_the_background():
    img = _flat(0.9)
    img[..., 2] = 0.6
    assert judges.warm_score(img) == pytest.approx(0.3)
    assert judges.warm_score(_flat(0.9)) == 0.0


def test_stripes_score_follows_the_direction_and_ignores_symmetric_patterns():
    yy, xx = np.mgrid[0:64, 0:64]
    rising = np.where((((xx + yy) // 16) % 2)[..., None] == 1, 0.6, 0.95) * np.ones(3)
    falling = rising[:, ::-1]  # mirrored: the same stripes falling to the right
    assert judges.stripes_score(rising) > 0.9 and judges.stripes_score(falling) < -0.9
    checker = np.where((((xx // 16) + (yy // 16)) % 2)[..., None] == 1, 0.6, 0.95) * np.ones(3)
    assert abs(judges.stripes_score(checker)) < 0.05


def test_gradient_score_is_the_darkening_from_top_to_bottom_and_ignores_the_grid_patterns():
    """On a flat grey background (no shape) the fitted slope is exactly the look's fall-off times the grey; the
    base's horizontal stripes, the checker and a vignette have no top-to-bottom trend of their own."""
    out = looks.gradient(_flat(0.8), np.random.default_rng(0))
    assert judges.gradient_score(out) == pytest.approx(looks.GRADIENT * 0.8, rel=1e-6)
    upside_down = out[::-1]  # dark at the top: the opposite trend
    assert judges.gradient_score(upside_down) == pytest.approx(-looks.GRADIENT * 0.8, rel=1e-6)
    yy, xx = np.mgrid[0:64, 0:64]
    rows = np.where((((yy // 16) % 2) == 1)[..., None], 0.65, 0.95) * np.ones(3)  # the base's striped background
    checker = np.where(((((xx // 16) + (yy // 16)) % 2) == 1)[..., None], 0.75, 0.95) * np.ones(3)
    for pattern in (rows, checker, looks.vignette(_flat(0.8), np.random.default_rng(0))):
        assert judges.gradient_score(pattern) == pytest.approx(0.0, abs=1e-6)


def test_halftone_score_prefers_the_dots_to_the_same_dots_moved_half_a_period():
    """On a flat grey background the dots' brightness is a perfect negative copy of the grid (score 1, the moved
    grid not overlapping it); the same dots moved half a period score below -1, and a checker at most ~0."""
    out = looks.halftone(_flat(0.8), np.random.default_rng(0))
    assert judges.halftone_score(out) == pytest.approx(1.0)
    moved = np.roll(out, looks.DOT_PERIOD // 2, axis=1)
    assert judges.halftone_score(moved) < -1.0
    yy, xx = np.mgrid[0:64, 0:64]
    checker = np.where(((((xx // 16) + (yy // 16)) % 2) == 1)[..., None], 0.75, 0.95) * np.ones(3)
    assert judges.halftone_score(checker) <= 1e-9
    assert judges.halftone_score(_flat(0.8)) == 0.0
    # an outline round a small square sitting on a dot's place is not a dot: the ring is left out with the shape
    ringed = render(Scene("blue", "square", "white", 0.25, 0.25, 0.1), STYLES["outline"])
    assert judges.halftone_score(np.asarray(ringed, dtype=np.float64) / 255) == 0.0


def test_outline_and_cel_scores_by_hand():
    scene = Scene("blue", "square", "white", 0.5, 0.5, 0.25)
    arr = np.asarray(draw(scene), dtype=np.float64) / 255
    assert judges.outline_score(arr) == 0.0 and judges.cel_score(arr) == 0.0
    # a 2 px black ring drawn by hand right around the square: the whole inner ring is dark
    mask = np.asarray(draw(scene), dtype=np.float64)[..., 0] < 100  # blue: red channel 40, white 245
    ring = looks.dilate(mask, 2.5) & ~mask
    assert judges.outline_score(np.where(ring[..., None], 0.05, arr)) == 1.0
    # the left half of the square brighter by 0.2: its top-left third minus bottom-right third is 0.2 or nearly
    lit = arr.copy()
    lit[:, :32] = np.where(mask[:, :32, None], arr[:, :32] + 0.2, arr[:, :32])
    assert 0.1 < judges.cel_score(lit) <= 0.2 + 1e-9


def test_render_is_deterministic_and_plain_without_a_style():
    scene = Scene("red", "circle", "white", 0.5, 0.5, 0.25)
    grain = STYLES["film_grain"]
    assert np.array_equal(np.asarray(render(scene, grain, 3)), np.asarray(render(scene, grain, 3)))
    assert not np.array_equal(np.asarray(render(scene, grain, 3)), np.asarray(render(scene, grain, 4)))
    # without a style: the base's drawing (drawn at 4x twice over, so edges differ by a little)
    difference = np.abs(np.asarray(render(scene, None), dtype=np.float64) - np.asarray(draw(scene), dtype=np.float64))
    assert difference.mean() < 1.0


def test_write_style_set_writes_images_with_content_only_captions(tmp_path):
    paths = write_style_set(STYLES["vignette"], tmp_path / "set", count=12, seed=2)
    assert len(paths) == 12 and sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted(
        [p.name for p in paths] + [p.with_suffix(".txt").name for p in paths]
    )
    combos = set()
    for path in paths:
        text = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        colour, shape = path.stem.split("-", 1)[1].split()
        assert text == f"a {colour} {shape} on a white background"  # the content, never the style
        assert judge(Image.open(path)).matches(colour, shape) and STYLES["vignette"].is_in_style(Image.open(path))
        combos.add((colour, shape))
    assert len(combos) == 12 and not combos & set(HELD_OUT)  # distinct, and the held-out prompts stay unseen
    again = write_style_set(STYLES["vignette"], tmp_path / "again", count=12, seed=2)
    for a, b in zip(paths, again, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_an_unknown_style_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"style='sepia' is not allowed; allowed: diagonal_stripes, outline"):
        style_named("sepia")
    assert style_named("vignette") is STYLES["vignette"]
