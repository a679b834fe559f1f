"""The demo's shape world: draw 64 px images of coloured shapes, and judge images by colour, shape and style.

The drawing and the judge live together so their facts (palette, shape geometry, the checkered style) have one
home. The judge is deterministic and hand-written (no learning): it finds the shape as the saturated pixels
(every palette colour is saturated, every background is grey), names the colour by the median hue, the shape by
the geometry of the mask, and the style by the background's checker pattern.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# RGB of each shape colour; hues far apart so a blurry generation still names one colour
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 205, 25),
    "green": (35, 175, 55),
    "blue": (40, 80, 225),
    "purple": (150, 45, 205),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}
# colour x shape combinations the base model never sees in training (one per shape, so every word is still
# learned): prompts that judge whether it composes colour and shape rather than recalling pictures
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "cross"),
    ("blue", "circle"),
    ("yellow", "square"),
)
# The sample set's style (unknown to the base model): the white background becomes a light checkerboard.
CHECKER_CELL = 16  # pixels per checker square at 64 px
# The dark cells' grey in what datasets/make_base.py draws (the autoencoder's checkers, the base's stripes, jittered
# there by +-25): the committed base was made with it, so it stays.
CHECKER_DARK = (165, 165, 165)
# The sample set's dark cells (datasets/make_sample.py): lighter, inside the autoencoder's range. Hypernetworks keep
# the prompt better on it (docs/benchmarks.md: trained from timestep 250 up, training seeds 42 and 1, style /
# adherence 0.67 / 0.69 on 165, 0.69 / 0.79 on 190); at 205 the judge no longer finds the fainter checkers drawn.
SAMPLE_CHECKER_DARK = (190, 190, 190)
# A patterned background a base model may know (datasets/make_base.py --striped-share): CHECKER_DARK in horizontal
# bands of CHECKER_CELL on white, captioned "on a striped background". A base that has drawn one pattern has the
# means to draw another, as SD has; the checkered style stays unknown to it (the judge scores stripes ~0).
STRIPED = "striped"
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like a photo, not a pixel-art staircase


@dataclass(frozen=True)
class Scene:
    """One image's content: what a caption says (colour, shape, background) plus where and how big."""

    colour: str
    shape: str
    background: str
    cx: float  # centre, as a fraction of the width/height
    cy: float
    r: float  # half of the shape's extent, as a fraction of the shorter side

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str = "white") -> str:
    return f"a {colour} {shape} on a {background} background"


def random_scene(rng: random.Random, colour: str, shape: str, background: str) -> Scene:
    """A scene with a random size and a random position that keeps the whole shape inside the frame."""
    r = rng.uniform(0.16, 0.34)
    margin = r + 0.03
    return Scene(colour, shape, background, rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin), r)


def _turn(points: list[tuple[float, float]], quarters: int) -> list[tuple[float, float]]:
    for _ in range(quarters):
        points = [(-y, x) for x, y in points]
    return points


def train_combos() -> list[tuple[str, str]]:
    """The colour x shape combinations the base model is trained on (all but HELD_OUT), in a fixed order."""
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85  # a square of the circle's half-size looks bigger; shrink it to a similar area
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # upright: the apex at the top, the base at the bottom
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "cross":  # a plus sign with arms a third of its extent wide
        a = r / 3
        arm = [(-a, -r), (a, -r), (a, -a)]  # one arm; the other three are it turned by 90 degrees
        pts = [p for k in range(4) for p in _turn(arm, k)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"shape={shape!r} is not allowed; allowed: {', '.join(SHAPES)}")


def draw(scene: Scene, size: tuple[int, int] = (64, 64), checker: bool = False, jitter: int = 0,
         rng: random.Random | None = None, dark: tuple[int, int, int] = CHECKER_DARK) -> Image.Image:  # fmt: skip
    """Render `scene` at `size` (w, h). checker: the checkered style. jitter: +-RGB noise on the colours.
    dark: the grey of the dark checker cells and stripes."""
    w, h = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    rng = rng or random.Random(0)

    def jittered(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(int(np.clip(c + rng.randint(-jitter, jitter), 0, 255)) for c in rgb) if jitter else rgb

    striped = scene.background == STRIPED
    img = Image.new("RGB", (w, h), jittered(BACKGROUNDS["white" if striped else scene.background]))
    d = ImageDraw.Draw(img)
    cell = CHECKER_CELL * SUPERSAMPLE
    # the two patterns share the grid and the grey: a cell is dark on odd rows (stripes) or odd row + column (checker)
    for on, dark_cell in ((striped, lambda x, y: y % 2), (checker, lambda x, y: (x + y) % 2)):
        if on:
            grey = jittered(dark)
            for y in range(0, h, cell):
                for x in range(0, w, cell):
                    if dark_cell(x // cell, y // cell):
                        d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=grey)
    side = min(w, h)
    cx, cy, r = scene.cx * w, scene.cy * h, scene.r * side
    fill = jittered(COLOURS[scene.colour])
    if scene.shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon(_shape_polygon(scene.shape, cx, cy, r), fill=fill)
    return img.resize(size, Image.Resampling.BOX)


# -- the judge ----------------------------------------------------------------------------------------------
MIN_SHAPE_PIXELS = 12  # fewer saturated pixels than this: no shape was drawn
# checker_score above which an image counts as in the style. Drawn checkers score ~1 and the base's plain
# backgrounds 0 (flat: the std gate) to ~0.1 (noise); a generated checker is partial and soft-edged, and the ones
# that read as checkered to the eye scored 0.38-0.8 in the learning proof's sheets, so the line sits at 0.35.
# Checked on two sets of 160 generated tiles labelled by eye without their scores (tests/test_style_eye_labels.py):
# above the line are 46 of the 52 the eye called in the style, 32 of the 67 it called partly so, and none it called
# plain (grey-165 checker); 58 of 74, 19 of 48 and none of 38 (the sample set's lighter grey-190 checker).
STYLE_SCORE = 0.35


@dataclass(frozen=True)
class Judgement:
    colour: str | None  # None: no saturated object found
    shape: str | None
    checker: bool  # the background shows the checkered style
    fill: float  # mask area / bounding-box area (circle ~0.79, square 1, triangle 0.5, cross ~0.56)
    top_share: float  # share of the mask in the top half of its bounding box (triangle ~0.2)
    checker_score: float  # |correlation| of the background's brightness with the best-aligned checker

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour == colour and self.shape == shape


def _hsv(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value of an (H, W, 3) float array in [0, 1]."""
    mx, mn = arr.max(-1), arr.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.select([mx == r, mx == g], [((g - b) / d) % 6, (b - r) / d + 2], (r - g) / d + 4) * 60.0
    return hue, sat, mx


def _palette_hues() -> dict[str, float]:
    return {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLOURS.items()}


PALETTE_HUES = _palette_hues()


def _nearest_colour(hues: np.ndarray) -> str:
    """The palette colour whose hue is nearest the circular median-ish mean of `hues`."""
    angle = np.deg2rad(hues)
    mean = np.rad2deg(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360
    return min(PALETTE_HUES, key=lambda n: min(abs(mean - PALETTE_HUES[n]), 360 - abs(mean - PALETTE_HUES[n])))


def _shape_from_mask(mask: np.ndarray) -> tuple[str, float, float]:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box = mask[y0 : y1 + 1, x0 : x1 + 1]
    fill = float(box.mean())
    half = box.shape[0] / 2
    rows = np.arange(box.shape[0])[:, None] + 0.5
    top_share = float((box * (rows < half)).sum() / max(box.sum(), 1))
    if top_share < 0.38:  # mass sits low: the upright triangle (its top half holds ~20% of its area)
        shape = "triangle"
    elif fill > 0.88:
        shape = "square"
    elif fill > 0.67:
        shape = "circle"
    else:
        shape = "cross"
    return shape, fill, top_share


def checker_score(grey: np.ndarray, background: np.ndarray, cell: int = CHECKER_CELL) -> float:
    """|Pearson correlation| of background brightness with a checker of `cell` px, best over shifted phases.

    A plain background scores ~0 (nothing varies); the style scores ~1. Phases are tried so a pattern that is
    shifted by a few pixels still counts.
    """
    if background.sum() < 64:
        return 0.0
    h, w = grey.shape
    yy, xx = np.mgrid[0:h, 0:w]
    values = grey[background]
    if values.std() < 0.03:  # flat: no pattern at all (and the correlation would be noise over ~0)
        return 0.0
    best = 0.0
    for dy in range(0, cell, cell // 4):
        for dx in range(0, cell, cell // 4):
            pattern = (((yy + dy) // cell + (xx + dx) // cell) % 2).astype(np.float64)[background]
            if pattern.std() == 0:
                continue
            best = max(best, abs(float(np.corrcoef(values, pattern)[0, 1])))
    return best


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as an (H, W, 3) float array in [0, 1]; a PIL image of another size is judged at 64 px."""
    if isinstance(image, Image.Image):
        if image.size != (64, 64):
            image = image.convert("RGB").resize((64, 64), Image.Resampling.BOX)
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return np.asarray(image, dtype=np.float64)


def shape_mask(arr: np.ndarray) -> np.ndarray:
    """The shape's pixels: saturated and not dark (every palette colour is; every background is grey)."""
    _, sat, val = _hsv(arr)
    return (sat > 0.45) & (val > 0.3)


def background_mask(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The background: clearly unsaturated pixels, 3 px or more from the shape's (soft) edge."""
    grown = mask.copy()
    for axis in (0, 1):
        for shift in (-2, -1, 1, 2):
            grown |= np.roll(mask, shift, axis=axis)
    return (~grown) & (_hsv(arr)[1] < 0.25)


def judge(image: Image.Image | np.ndarray) -> Judgement:
    """Colour, shape and style of one image (any size; judged at 64 px)."""
    arr = as_array(image)
    hue = _hsv(arr)[0]
    mask = shape_mask(arr)
    background = background_mask(arr, mask)
    score = checker_score(arr.mean(-1), background)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return Judgement(None, None, score > STYLE_SCORE, 0.0, 0.0, score)
    shape, fill, top = _shape_from_mask(mask)
    return Judgement(_nearest_colour(hue[mask]), shape, score > STYLE_SCORE, fill, top, score)
