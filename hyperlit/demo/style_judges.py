"""The style suite's judges: one score per look, measured on a 64 px image, high when the image is in the style.

Each score is a plain measurement (a correlation, a share of pixels, a brightness difference) that a plain shapes
image has near 0: the base model's renders are flat shapes on flat backgrounds. The lines that turn a score into
"in the style" live in hyperlit.demo.styles with the reason for each. Every judge looks past the shape where the
style is in the background, and at the shape where the style is in the shape, so the shapes judge (colour, shape)
still judges the prompt on the same image.
"""

from __future__ import annotations

import numpy as np

from .shapes import CHECKER_CELL, MIN_SHAPE_PIXELS, background_mask, shape_mask
from .style_looks import DOT_PERIOD, STRIPE_PERIOD, dilate, dot_grid

MIN_PIXELS = 64  # fewer measured pixels than this: no score (a shape that fills the frame, an empty background)


def pattern_score(values: np.ndarray, patterns: list[np.ndarray]) -> float:
    """The best |Pearson correlation| of `values` with any of `patterns` (flat values: 0, nothing varies)."""
    if values.size < MIN_PIXELS or values.std() < 0.03:  # the same flat gate as the checker judge
        return 0.0
    best = 0.0
    for pattern in patterns:
        if pattern.std() > 0:
            best = max(best, abs(float(np.corrcoef(values, pattern)[0, 1])))
    return best


def stripes_score(arr: np.ndarray) -> float:
    """How much better the background's brightness matches stripes rising to the right than the same stripes
    falling to the right (|correlation|, best over 8 phases each).

    The mirrored stripes are the control: a checker, horizontal stripes or a vignette match both directions alike
    and score ~0, while the style matches one (~0.95 drawn, ~0.7 after the autoencoder's round trip).
    """
    background = background_mask(arr, shape_mask(arr))
    h, w = background.shape
    yy, xx = np.mgrid[0:h, 0:w]
    half = STRIPE_PERIOD / 2
    phases = range(0, STRIPE_PERIOD, STRIPE_PERIOD // 8)
    values = arr.mean(-1)[background]
    rising, falling = (
        pattern_score(values, [(((xx + sign * yy + p) // half) % 2).astype(np.float64)[background] for p in phases])
        for sign in (1, -1)
    )
    return rising - falling


def outline_score(arr: np.ndarray) -> float:
    """Share of the ring 1-2 px outside the shape that is much darker than the background 4-7 px out."""
    mask = shape_mask(arr)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return 0.0
    value = arr.max(-1)  # a coloured anti-aliased edge keeps a high value; a dark line does not
    ring = dilate(mask, 2) & ~mask
    far = dilate(mask, 7) & ~dilate(mask, 4)
    if far.sum() < MIN_PIXELS:
        return 0.0
    return float((value[ring] < np.median(value[far]) - 0.35).mean())


def warm_score(arr: np.ndarray) -> float:
    """Median red minus blue of everything but the shape: 0 on grey and white, ~0.3 under the warm grade."""
    rest = ~dilate(shape_mask(arr), 2)
    if rest.sum() < MIN_PIXELS:
        return 0.0
    return float(np.median(arr[..., 0][rest] - arr[..., 2][rest]))


def grain_score(arr: np.ndarray) -> float:
    """Median |brightness - its 3x3 mean| over the background: 0 where flat, ~0.6 x the grain's std under grain."""
    grey = arr.mean(-1)
    padded = np.pad(grey, 1, mode="edge")
    h, w = grey.shape
    local = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    background = background_mask(arr, shape_mask(arr))
    if background.sum() < MIN_PIXELS:
        return 0.0
    return float(np.median(np.abs(grey - local)[background]))


def vignette_score(arr: np.ndarray) -> float:
    """How much darker the background is at the corners than at the centre: a least-squares fit of brightness
    against the squared radius (so a shape or a pattern anywhere does not decide it)."""
    rest = ~dilate(shape_mask(arr), 4)  # past an outline's dark ring too
    if rest.sum() < MIN_PIXELS:
        return 0.0
    h, w = rest.shape
    yy, xx = np.mgrid[0:h, 0:w]
    rho2 = (((yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2) / ((h / 2) ** 2 + (w / 2) ** 2))[rest]
    if rho2.std() < 0.05:  # the background is all at one radius: no trend can be seen
        return 0.0
    slope = np.polyfit(rho2, arr.mean(-1)[rest], 1)[0]
    return float(-slope)


def cel_score(arr: np.ndarray) -> float:
    """Mean brightness of the shape's top-left third minus its bottom-right third (thirds of x + y across its box),
    the 1 px edge left out: 0 for a flat fill, and noise (grain) averages out where a spread would not."""
    mask = shape_mask(arr)
    inner = mask & ~dilate(~mask, 1)
    if inner.sum() < MIN_SHAPE_PIXELS:
        return 0.0
    ys, xs = np.nonzero(inner)
    t = ((xs - xs.min()) / max(np.ptp(xs), 1) + (ys - ys.min()) / max(np.ptp(ys), 1)) / 2
    lum = arr.mean(-1)[ys, xs]
    light, dark = lum[t < 1 / 3], lum[t > 2 / 3]
    if light.size == 0 or dark.size == 0:
        return 0.0
    return float(light.mean() - dark.mean())


def gradient_score(arr: np.ndarray) -> float:
    """How much brighter the background is at the top edge than at the bottom: a least-squares fit of its
    brightness against x, y, the squared radius and the 16 px grid's patterns together, so a vignette (radius), the
    base's striped background, the checker, a shape's placement or a sideways trend does not count, only the
    top-to-bottom trend."""
    rest = ~dilate(shape_mask(arr), 4)  # past an outline's dark ring too, as the vignette judge
    if rest.sum() < MIN_PIXELS:
        return 0.0
    h, w = rest.shape
    yy, xx = np.mgrid[0:h, 0:w]
    y, x = (yy + 0.5) / h - 0.5, (xx + 0.5) / w - 0.5  # -0.5 at the top (left) edge, 0.5 at the bottom (right)
    # the base's horizontal stripes (dark on odd rows of CHECKER_CELL), the sample set's checker and the diagonal
    # stripes lean top-light over 64 px with a shape hiding part of them, so they are fitted too: the exact rows,
    # columns and checker cells of that grid, and a sine and cosine of its 32 px period along y, x and both
    # diagonals (soft, shifted patterns). A straight gradient is none of them: its slope is found exactly
    rows, cols = (yy // CHECKER_CELL) % 2, (xx // CHECKER_CELL) % 2
    grid = [rows, cols, (rows + cols) % 2]
    waves = [f(np.pi * t / CHECKER_CELL) for t in (yy, xx, xx + yy, xx - yy) for f in (np.sin, np.cos)]
    terms = np.stack([np.ones_like(x), x, y, 2 * (x * x + y * y), *grid, *waves], -1).astype(np.float64)[rest]
    coef = np.linalg.lstsq(terms, arr.mean(-1)[rest], rcond=None)[0]
    return float(-coef[2])


def halftone_score(arr: np.ndarray) -> float:
    """How much better the background's darkness matches the halftone's dot grid than the same grid moved half a
    period sideways (Pearson correlations; the moved grid's only when positive).

    The moved grid is the control: horizontal stripes, a vertical gradient and flat backgrounds match both alike,
    and a checker or a vignette matches the moved grid at least as well (~0.88 drawn, ~0.82 after the round trip).
    """
    mask = shape_mask(arr)
    background = background_mask(arr, mask) & ~dilate(mask, 4)  # past an outline's dark ring, as the vignette judge
    values = arr.mean(-1)[background]
    if values.size < MIN_PIXELS or values.std() < 0.03:  # the same flat gate as pattern_score
        return 0.0
    h, w = background.shape
    on = dot_grid(h, w, 1.0)[background]
    moved = np.roll(dot_grid(h, w, 1.0), DOT_PERIOD // 2, axis=1)[background]
    at, beside = (
        -float(np.corrcoef(values, grid)[0, 1]) if grid.std() > 0 else 0.0 for grid in (on, moved)
    )  # darker where the dots are: a negative correlation of brightness with the grid
    return at - max(beside, 0.0)
