"""Each style judge's number against a reference computed another way, on images whose shape is known exactly.

test_styles.py shows that the judges separate the styles; these pin what each one measures: distances to the shape
from scipy's Euclidean distance transform instead of hyperlit's disk dilation, correlations from scipy.stats,
local means from scipy.ndimage, cel bands in integer arithmetic, the gradient's slope recovered exactly through
every nuisance pattern its fit removes, and the gates (too few pixels, flat values, empty bands) at their edges.
The rendering and training-folder helpers of hyperlit.demo.styles are checked against a 4x4 box average.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import distance_transform_edt, uniform_filter
from scipy.stats import pearsonr

from hyperlit.demo import style_judges as judges
from hyperlit.demo import style_looks as looks
from hyperlit.demo.shapes import Scene, background_mask, draw, shape_mask
from hyperlit.demo.styles import STYLES, Style, render, style_scenes, style_share, write_style_set

RED = (0.9, 0.1, 0.1)  # saturated: the shape; every grey is background


def picture(grey: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """A grey image with the red shape on it (the shape mask must come back exactly)."""
    arr = np.repeat(np.asarray(grey, dtype=np.float64)[..., None], 3, -1)
    arr[shape] = RED
    assert np.array_equal(shape_mask(arr), shape)
    return arr


def distance(shape: np.ndarray) -> np.ndarray:
    """Euclidean distance from each pixel centre to the nearest shape pixel's (inf without a shape)."""
    if not shape.any():
        return np.full(shape.shape, np.inf)
    return distance_transform_edt(~shape)


def rect(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[rows, cols] = True
    return mask


def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(pearsonr(a, b)[0])


# -- pattern_score ------------------------------------------------------------------------------------------------


def test_pattern_score_is_the_best_absolute_correlation_behind_the_size_and_flatness_gates():
    rng = np.random.default_rng(0)
    pattern = (np.arange(200) % 2).astype(np.float64)
    other = rng.random(200)
    values = 0.5 + 0.1 * pattern + rng.normal(0, 0.05, 200)
    expected = max(abs(correlation(values, pattern)), abs(correlation(values, other)))
    assert judges.pattern_score(values, [other, pattern]) == pytest.approx(expected, rel=1e-12)
    assert judges.pattern_score(1 - values, [pattern]) == pytest.approx(abs(correlation(values, pattern)), rel=1e-12)
    # 64 values are enough, 63 are not
    assert judges.pattern_score(values[:64], [pattern[:64]]) == pytest.approx(
        abs(correlation(values[:64], pattern[:64])), rel=1e-12
    )
    assert judges.pattern_score(values[:63], [pattern[:63]]) == 0.0
    # the flat gate: a std of exactly 0.03 is measured, anything flatter scores 0 however well it correlates
    two_levels = np.where(pattern[:64] == 1, 0.16, 0.1)
    assert two_levels.std() == 0.03
    assert judges.pattern_score(two_levels, [pattern[:64]]) == pytest.approx(1.0)
    assert judges.pattern_score(0.1 + 0.04 * pattern, [pattern]) == 0.0  # std 0.02
    assert judges.pattern_score(np.full(200, 0.5), [pattern]) == 0.0
    # a flat pattern is skipped (no NaN correlation, no numpy warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert judges.pattern_score(values, [np.ones(200), pattern]) == pytest.approx(
            abs(correlation(values, pattern)), rel=1e-12
        )


# -- stripes_score ------------------------------------------------------------------------------------------------


def stripes_reference(arr: np.ndarray) -> float:
    """Best |r| over eight phases (every 4 px of the 32 px period) rising minus the same falling."""
    keep = background_mask(arr, shape_mask(arr))
    values = arr.mean(-1)[keep]
    yy, xx = grid(*keep.shape)
    best = {}
    for direction in (1, -1):
        scores = []
        for phase in range(0, 32, 4):
            band = np.floor((xx + direction * yy + phase) / 16) % 2
            scores.append(abs(correlation(values, band[keep])))
        best[direction] = max(scores)
    return best[1] - best[-1]


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 6])
def test_stripes_score_takes_the_best_of_eight_phases(offset):
    """Stripes drawn between two of the judge's phases match neither exactly: finer phases would score higher."""
    yy, xx = grid(64, 64)
    rng = np.random.default_rng(offset)
    grey = np.where(((xx + yy + offset) // 16) % 2 == 1, 0.6, 0.9) + rng.normal(0, 0.02, (64, 64))
    arr = picture(grey, rect(64, 64, slice(20, 36), slice(24, 40)))
    expected = stripes_reference(arr)
    assert judges.stripes_score(arr) == pytest.approx(expected, rel=1e-9)
    mirrored = arr[:, ::-1]
    assert judges.stripes_score(mirrored) == pytest.approx(stripes_reference(mirrored), rel=1e-9)


# -- outline_score ------------------------------------------------------------------------------------------------


def outline_reference(arr: np.ndarray, shape: np.ndarray) -> float:
    if shape.sum() < 12:
        return 0.0
    d, value = distance(shape), arr.max(-1)
    ring, far = (d > 0) & (d <= 2), (d > 4) & (d <= 7)
    if far.sum() < 64:
        return 0.0
    return float(np.mean(value[ring] < np.median(value[far]) - 0.35))


def test_outline_score_compares_the_ring_with_the_band_4_to_7_px_out():
    """Brightness rising with the distance from the shape and the ring's brightness spread across x: a band any
    nearer, farther or wider moves the median and so the share of the ring below it."""
    shape = rect(64, 64, slice(22, 42), slice(20, 44))
    d = distance(shape)
    yy, xx = grid(64, 64)
    grey = np.where(d <= 2, 0.1 + 0.8 * (xx - 18) / 27, np.clip(0.35 + 0.07 * d, 0, 1))
    arr = picture(grey, shape)
    expected = outline_reference(arr, shape)
    assert 0.1 < expected < 0.9
    assert judges.outline_score(arr) == pytest.approx(expected, abs=1e-12)


def test_outline_score_gates():
    # a 12-pixel shape is measured, an 11-pixel one is not
    shape = rect(64, 64, slice(30, 33), slice(30, 34))
    ring = (distance(shape) > 0) & (distance(shape) <= 2)
    assert shape.sum() == 12 and judges.outline_score(picture(np.where(ring, 0.05, 0.9), shape)) == 1.0
    shape[32, 33] = False
    ring = (distance(shape) > 0) & (distance(shape) <= 2)
    assert shape.sum() == 11 and judges.outline_score(picture(np.where(ring, 0.05, 0.9), shape)) == 0.0
    # the band 4-7 px out holds exactly 64 pixels (rows at 5 and 6 px below a 32 px wide band): measured
    shape = rect(10, 32, slice(0, 4), slice(None))
    d = distance(shape)
    assert ((d > 4) & (d <= 7)).sum() == 64
    assert judges.outline_score(picture(np.where(d <= 2, 0.05, 0.9), shape)) == 1.0
    # fewer than 64 there (a 16 px image the shape nearly fills): no score, however dark the ring
    shape = rect(16, 16, slice(3, 13), slice(3, 13))
    d = distance(shape)
    assert judges.outline_score(picture(np.where(d <= 2, 0.05, 0.9), shape)) == 0.0
    # the ring exactly 0.35 below the band's median is not darker than the line; a step below it is
    shape = rect(64, 64, slice(22, 42), slice(20, 44))
    d = distance(shape)
    line = np.float64(0.9) - 0.35
    assert judges.outline_score(picture(np.where(d <= 2, line, 0.9), shape)) == 0.0
    assert judges.outline_score(picture(np.where(d <= 2, np.nextafter(line, 0), 0.9), shape)) == 1.0


# -- warm_score ---------------------------------------------------------------------------------------------------


def test_warm_score_is_the_median_red_minus_blue_more_than_2_px_from_the_shape():
    rng = np.random.default_rng(1)
    shape = rect(64, 64, slice(20, 40), slice(18, 46))
    d = distance(shape)
    low_high = ((0.7, 0.9), (0.5, 0.9), (0.5, 0.7))  # red, green, blue: three different channels, all unsaturated
    arr = np.stack([rng.uniform(lo, hi, (64, 64)) for lo, hi in low_high], -1)
    arr[(d > 2) & (d <= 3)] = (0.9, 0.7, 0.55)  # warmer just past the 2 px edge: in the median
    arr[d <= 2] = (0.5, 0.5, 0.5)
    arr[shape] = RED
    assert np.array_equal(shape_mask(arr), shape)
    rest = d > 2
    expected = float(np.median(arr[..., 0][rest] - arr[..., 2][rest]))
    assert judges.warm_score(arr) == pytest.approx(expected, abs=1e-12)
    # 64 measured pixels (an 8 px image without a shape) are enough
    small = np.stack([np.full((8, 8), 0.9), np.full((8, 8), 0.8), np.full((8, 8), 0.6)], -1)
    assert judges.warm_score(small) == pytest.approx(0.3)
    # a shape filling the frame but for a 2 px border leaves nothing to measure
    shape = rect(64, 64, slice(2, 62), slice(2, 62))
    assert judges.warm_score(picture(np.full((64, 64), 0.9), shape)) == 0.0


# -- grain_score --------------------------------------------------------------------------------------------------


def test_grain_score_is_the_median_distance_from_the_3x3_mean_over_the_background():
    rng = np.random.default_rng(2)
    shape = rect(64, 64, slice(10, 30), slice(30, 50))
    grey = np.clip(0.6 + np.cumsum(rng.normal(0, 0.03, (64, 64)), axis=1), 0.05, 0.95)  # not white noise
    arr = picture(grey, shape)
    plain = arr.mean(-1)
    local = uniform_filter(plain, size=3, mode="nearest")
    keep = background_mask(arr, shape)
    expected = float(np.median(np.abs(plain - local)[keep]))
    assert judges.grain_score(arr) == pytest.approx(expected, rel=1e-12)
    # an 8 px image without a shape: 64 background pixels, measured
    small = picture(0.5 + rng.normal(0, 0.05, (8, 8)), np.zeros((8, 8), dtype=bool))
    local = uniform_filter(small.mean(-1), size=3, mode="nearest")
    assert judges.grain_score(small) == pytest.approx(float(np.median(np.abs(small.mean(-1) - local))), rel=1e-12)


# -- vignette_score -----------------------------------------------------------------------------------------------


def squared_radius(h: int, w: int) -> np.ndarray:
    yy, xx = grid(h, w)
    return ((yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2) / ((h / 2) ** 2 + (w / 2) ** 2)


def vignette_reference(arr: np.ndarray, shape: np.ndarray) -> float:
    rest = distance(shape) > 4
    if rest.sum() < 64:
        return 0.0
    r, v = squared_radius(*shape.shape)[rest], arr.mean(-1)[rest]
    if r.std() < 0.05:
        return 0.0
    return float(-np.cov(r, v, bias=True)[0, 1] / r.var())  # least-squares slope, closed form


def test_vignette_score_is_the_fitted_fall_with_the_squared_radius_more_than_4_px_from_the_shape():
    rng = np.random.default_rng(3)
    shape = rect(64, 64, slice(12, 30), slice(8, 28))
    d = distance(shape)
    grey = 0.9 - 0.4 * squared_radius(64, 64) + rng.normal(0, 0.01, (64, 64))
    grey[(d > 4) & (d <= 5)] = 0.2  # a dark halo 4-5 px out: measured
    grey[(d > 0) & (d <= 4)] = 0.95  # nearer: left out
    arr = picture(grey, shape)
    assert judges.vignette_score(arr) == pytest.approx(vignette_reference(arr, shape), rel=1e-9)
    # an 8 px image without a shape: 64 pixels, measured
    small = picture(0.9 - 0.4 * squared_radius(8, 8), np.zeros((8, 8), dtype=bool))
    assert judges.vignette_score(small) == pytest.approx(0.4, rel=1e-9)
    # a shape filling the frame but for a 4 px border: nothing left
    assert judges.vignette_score(picture(np.full((64, 64), 0.9), rect(64, 64, slice(4, 60), slice(4, 60)))) == 0.0
    # a disk leaving only the corners (84 pixels, all at about one radius): no trend can be seen
    yy, xx = grid(64, 64)
    disk = (yy + 0.5 - 32) ** 2 + (xx + 0.5 - 32) ** 2 <= 37**2
    corners = distance(disk) > 4
    assert corners.sum() == 84 and squared_radius(64, 64)[corners].std() < 0.05
    assert judges.vignette_score(picture(0.9 - 0.4 * squared_radius(64, 64), disk)) == 0.0


# -- cel_score ----------------------------------------------------------------------------------------------------


def cel_reference(arr: np.ndarray, shape: np.ndarray) -> float:
    """Bands in integer arithmetic: t = (dx / px + dy / py) / 2 < 1/3  <=>  3 (dx py + dy px) < 2 px py."""
    inner = shape & (distance_transform_edt(shape) > 1)  # every 4-neighbour inside the shape
    if inner.sum() < 12:
        return 0.0
    ys, xs = np.nonzero(inner)
    px, py = max(int(np.ptp(xs)), 1), max(int(np.ptp(ys)), 1)
    k = 3 * ((xs - xs.min()) * py + (ys - ys.min()) * px)
    lum = arr.mean(-1)[ys, xs]
    light, dark = lum[k < 2 * px * py], lum[k > 4 * px * py]
    if light.size == 0 or dark.size == 0:
        return 0.0
    return float(light.mean() - dark.mean())


def shaded(shape: np.ndarray, seed: int) -> np.ndarray:
    """The shape in red of random brightness (still saturated) on white."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.5, 1.0, shape.shape)
    arr = np.ones((*shape.shape, 3))
    arr[shape] = np.stack([v, 0.1 * v, 0.1 * v], -1)[shape]
    assert np.array_equal(shape_mask(arr), shape)
    return arr


@pytest.mark.parametrize(
    "rows, cols",
    [
        (slice(10, 28), slice(20, 25)),  # inner 3 x 16: one pixel exactly on each third's line (t = 1/3, 2/3)
        (slice(10, 50), slice(20, 24)),  # inner 2 px wide
        (slice(20, 24), slice(5, 60)),  # inner 2 px high
        (slice(10, 15), slice(10, 16)),  # inner 3 x 4 = 12 pixels: just enough
    ],
)
def test_cel_score_is_the_top_left_third_minus_the_bottom_right_third(rows, cols):
    shape = rect(64, 64, rows, cols)
    arr = shaded(shape, 4)
    expected = cel_reference(arr, shape)
    assert expected != 0.0
    assert judges.cel_score(arr) == pytest.approx(expected, abs=1e-12)


def test_cel_score_gates():
    # inner 3 x 3: too small
    assert judges.cel_score(shaded(rect(64, 64, slice(10, 15), slice(10, 15)), 5)) == 0.0
    # an L mirrored (bottom and right bands): no inner pixel in the top-left third, so no score
    corner = rect(64, 64, slice(50, 62), slice(2, 62)) | rect(64, 64, slice(2, 62), slice(50, 62))
    assert cel_reference(shaded(corner, 6), corner) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert judges.cel_score(shaded(corner, 6)) == 0.0
    # the same with a plus at the top left whose centre is the only inner pixel there: a one-pixel light band
    plus = corner.copy()
    plus[1:4, 2] = plus[2, 1:4] = True
    arr = shaded(plus, 7)
    assert cel_reference(arr, plus) != 0.0
    assert judges.cel_score(arr) == pytest.approx(cel_reference(arr, plus), abs=1e-12)
    # and turned round: a one-pixel dark band
    turned, arr = plus[::-1, ::-1], arr[::-1, ::-1]
    assert cel_reference(arr, turned) != 0.0
    assert judges.cel_score(arr) == pytest.approx(cel_reference(arr, turned), abs=1e-12)


# -- gradient_score -----------------------------------------------------------------------------------------------


def nuisances(h: int, w: int) -> list[np.ndarray]:
    """What the gradient judge fits besides the vertical trend, written out: the horizontal trend, the squared
    radius, the 16 px grid's row, column and checker patterns and 32 px sines and cosines along y, x and both
    diagonals."""
    yy, xx = grid(h, w)
    x, y = (xx + 0.5) / w - 0.5, (yy + 0.5) / h - 0.5
    rows, cols = (yy % 32 >= 16).astype(float), (xx % 32 >= 16).astype(float)
    out = [np.ones((h, w)), x, x * x + y * y, rows, cols, np.abs(rows - cols)]
    for t in (yy, xx, xx + yy, xx - yy):
        out += [np.sin(2 * np.pi * t / 32), np.cos(2 * np.pi * t / 32)]
    return out


def gradient_reference(arr: np.ndarray, shape: np.ndarray) -> float:
    rest = distance(shape) > 4
    if rest.sum() < 64:
        return 0.0
    h, w = shape.shape
    y = (grid(h, w)[0] + 0.5) / h - 0.5
    terms = np.stack([y, *nuisances(h, w)], -1)[rest]
    return float(-np.linalg.lstsq(terms, arr.mean(-1)[rest], rcond=None)[0][0])


def test_gradient_score_recovers_the_vertical_slope_exactly_through_every_nuisance_pattern():
    """The brightness is 0.2 darker per image height plus every pattern the fit removes, and the shape sits at the
    top left, so no symmetry hides a pattern the fit lacks: the slope comes back exactly."""
    h = w = 64
    y = (grid(h, w)[0] + 0.5) / h - 0.5
    weights = [0.55, 0.05, 0.15, 0.03, 0.02, 0.04, 0.01, -0.01, 0.012, 0.008, -0.006, 0.01, 0.007, -0.009]
    grey = -0.2 * y + sum(c * p for c, p in zip(weights, nuisances(h, w), strict=True))
    shape = rect(h, w, slice(4, 22), slice(6, 30))
    grey[(distance(shape) > 0) & (distance(shape) <= 4)] = 0.97  # within 4 px: left out
    arr = picture(grey, shape)
    assert judges.gradient_score(arr) == pytest.approx(0.2, rel=1e-9)
    # off the model 4-5 px from the shape: those pixels are fitted too
    halo = (distance(shape) > 4) & (distance(shape) <= 5)
    grey[halo] = 0.1
    arr = picture(grey, shape)
    assert judges.gradient_score(arr) == pytest.approx(gradient_reference(arr, shape), rel=1e-9)
    assert abs(judges.gradient_score(arr) - 0.2) > 1e-3
    # a shape filling the frame but for a 4 px border: nothing left
    assert judges.gradient_score(picture(np.full((64, 64), 0.9), rect(64, 64, slice(4, 60), slice(4, 60)))) == 0.0
    # an 8 px image without a shape: 64 pixels, measured
    small_y = (grid(8, 8)[0] + 0.5) / 8 - 0.5
    small = picture(0.6 - 0.2 * small_y, np.zeros((8, 8), dtype=bool))
    assert judges.gradient_score(small) == pytest.approx(0.2, rel=1e-6)


# -- halftone_score -----------------------------------------------------------------------------------------------


def dots(h: int, w: int, shift: int = 0) -> np.ndarray:
    """Dots of radius 8 centred at 16 + 32 k (x moved by `shift`), from the pixel centres."""
    yy, xx = grid(h, w)
    cy, cx = (yy + 0.5) - 16, (xx + 0.5) - 16 - shift
    return (cy - 32 * np.round(cy / 32)) ** 2 + (cx - 32 * np.round(cx / 32)) ** 2 <= 64


def halftone_reference(arr: np.ndarray, shape: np.ndarray) -> float:
    keep = background_mask(arr, shape) & (distance(shape) > 4)
    values = arr.mean(-1)[keep]
    if values.size < 64 or values.std() < 0.03:
        return 0.0
    scores = []
    for pattern in (dots(*shape.shape), dots(*shape.shape, 16)):
        p = pattern[keep].astype(np.float64)
        scores.append(-correlation(values, p) if p.std() > 0 else 0.0)
    return scores[0] - max(scores[1], 0.0)


def test_halftone_score_against_the_dots_and_the_dots_moved_half_a_period():
    assert np.array_equal(dots(64, 64), looks.dot_grid(64, 64, 1.0))
    rng = np.random.default_rng(8)
    shape = rect(64, 64, slice(12, 30), slice(8, 28))
    grey = 0.9 - 0.25 * dots(64, 64) - 0.1 * dots(64, 64, 16) + rng.normal(0, 0.02, (64, 64))
    halo = (distance(shape) > 4) & (distance(shape) <= 5)
    grey[halo] = np.where(dots(64, 64)[halo], 0.95, 0.3)  # the opposite of dots 4-5 px out: measured
    arr = picture(grey, shape)
    expected = halftone_reference(arr, shape)
    assert judges.halftone_score(arr) == pytest.approx(expected, rel=1e-9)


def two_bands(gap_rows: tuple[int, int]) -> np.ndarray:
    """A shape covering all of a 64 px image but rows gap_rows[0]..gap_rows[1] - 1."""
    shape = np.ones((64, 64), dtype=bool)
    shape[gap_rows[0] : gap_rows[1]] = False
    return shape


def test_halftone_score_gates():
    yy, xx = grid(64, 64)
    # one background row (row 20, 5 px from the shape on both sides): 64 values, measured
    shape = two_bands((16, 25))
    assert (background_mask(np.ones((64, 64, 3)), shape) & (distance(shape) > 4)).sum() == 64
    arr = picture(0.9 - 0.2 * dots(64, 64) + 0.001 * xx, shape)
    assert halftone_reference(arr, shape) != 0.0
    assert judges.halftone_score(arr) == pytest.approx(halftone_reference(arr, shape), rel=1e-9)
    # the row through the dots' centres (half of it dots) at a std of exactly 0.03 is measured
    shape = two_bands((11, 20))
    arr = picture(np.where(dots(64, 64), 0.15, 0.21), shape)
    keep = background_mask(arr, shape) & (distance(shape) > 4)
    assert keep.sum() == 64 and arr.mean(-1)[keep].std() == 0.03
    assert judges.halftone_score(arr) == pytest.approx(1.0)
    # background only where no dot of either grid lies (rows 32-39): no correlation to measure, 0, no NaN
    shape = two_bands((28, 44))
    assert not (dots(64, 64) | dots(64, 64, 16))[(distance(shape) > 4)].any()
    arr = picture(0.5 + 0.4 * xx / 63, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert judges.halftone_score(arr) == 0.0
    # a window with none of the dots but part of the moved dots, darker there: only the control counts (-1)
    shape = np.ones((64, 64), dtype=bool)
    shape[0:32, 22:42] = False
    window = distance(shape) > 4
    assert not dots(64, 64)[window].any() and dots(64, 64, 16)[window].any()
    arr = picture(np.where(dots(64, 64, 16), 0.6, 0.9), shape)
    assert judges.halftone_score(arr) == pytest.approx(-1.0)


# -- hyperlit.demo.styles: the line, rendering and the training folder -----------------------------------------


def box_reference(scene: Scene, look, seed: int) -> np.ndarray:
    """The scene drawn at 256 px, the look applied, clipped to [0, 1], then each 4x4 block averaged."""
    big = np.asarray(draw(scene, size=(256, 256)), dtype=np.float64) / 255
    if look is not None:
        big = np.clip(look(big, np.random.default_rng(seed)), 0.0, 1.0)
    levels = np.round(big * 255)
    return levels.reshape(64, 4, 64, 4, 3).mean((1, 3))


SCENE = Scene("red", "circle", "white", 0.4, 0.55, 0.3)


def test_is_in_style_means_strictly_above_the_line():
    at_line = Style("test", "a fixed score", looks.warm_grade, lambda arr: 0.5, 0.5, True)
    above = Style("test", "a fixed score", looks.warm_grade, lambda arr: float(np.nextafter(0.5, 1)), 0.5, True)
    image = np.zeros((64, 64, 3))
    assert not at_line.is_in_style(image) and above.is_in_style(image)


@pytest.mark.parametrize("name", [None, "film_grain", "outline"])
def test_render_is_the_look_at_4x_box_averaged(name):
    style = None if name is None else STYLES[name]
    got = np.asarray(render(SCENE, style, 7), dtype=np.float64)
    assert got.shape == (64, 64, 3)
    assert np.abs(got - box_reference(SCENE, None if style is None else style.look, 7)).max() <= 1.0
    if style is not None:  # the default seed is 0
        assert np.array_equal(np.asarray(render(SCENE, style)), np.asarray(render(SCENE, style, 0)))


def test_render_clips_a_look_that_leaves_zero_to_one():
    overdriven = Style("test", "out of range", lambda arr, rng: 3 * arr - 1.0, lambda arr: 0.0, 0.5, True)
    got = np.asarray(render(SCENE, overdriven, 0), dtype=np.float64)
    assert np.abs(got - box_reference(SCENE, overdriven.look, 0)).max() <= 1.0
    assert got.min() == 0 and got.max() == 255


def test_write_style_set_defaults_new_folders_and_seeds(tmp_path):
    grain = STYLES["film_grain"]
    out = tmp_path / "new" / "set"  # neither folder exists yet
    paths = write_style_set(grain, out)
    scenes = style_scenes(12, 0)
    assert [p.name for p in paths] == [f"{i + 1:02d}-{s.colour} {s.shape}.png" for i, s in enumerate(scenes)]
    for i, (path, scene) in enumerate(zip(paths, scenes, strict=True)):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(render(scene, grain, i)))
        assert path.with_suffix(".txt").read_bytes() == (scene.caption + "\n").encode("utf-8")
    again = write_style_set(grain, out, seed=3, count=4)  # the folder exists now: written over
    for i, (path, scene) in enumerate(zip(again, style_scenes(4, 3), strict=True)):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(render(scene, grain, 3000 + i)))


def test_style_share_of_no_images_is_a_one_line_error():
    with pytest.raises(ValueError) as error:
        style_share(STYLES["vignette"], [])
    assert str(error.value) == "style_share needs at least one image"
