"""``loss.png``: line plots of a run's losses (top) and learning rate (bottom) drawn with PIL (no matplotlib)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

WIDTH, PANEL, GAP, MARGIN_LEFT, MARGIN = 720, 300, 40, 70, 20
COLOURS = {"train/loss": (120, 160, 220), "train/total": (120, 160, 220), "val/loss": (220, 90, 30)}
LR_COLOUR = (60, 140, 60)
AXIS, GRID, PAPER = (0, 0, 0), (225, 225, 225), (255, 255, 255)


@dataclass(frozen=True)
class Series:
    """One metric over steps."""

    name: str
    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class Panel:
    """A plot area in image pixels and the data range it shows."""

    left: int
    top: int
    width: int
    height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def point(self, step: float, value: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        x = self.left + (step - x0) / ((x1 - x0) or 1) * self.width
        y = self.top + self.height - (value - y0) / ((y1 - y0) or 1) * self.height
        return x, y


def value_range(series: list[Series]) -> tuple[float, float]:
    values = [v for s in series for v in s.values]
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, title: str, font: ImageFont.ImageFont) -> None:
    """Frame, horizontal grid lines with their values, step ticks and the panel's title."""
    right, bottom = panel.left + panel.width, panel.top + panel.height
    for i in range(5):
        value = panel.y_range[0] + (panel.y_range[1] - panel.y_range[0]) * i / 4
        _, y = panel.point(panel.x_range[0], value)
        draw.line([(panel.left, y), (right, y)], fill=GRID)
        draw.text((panel.left - 6, y), f"{value:.3g}", fill=AXIS, font=font, anchor="rm")
    for i in range(5):
        step = panel.x_range[0] + (panel.x_range[1] - panel.x_range[0]) * i / 4
        x, _ = panel.point(step, panel.y_range[0])
        draw.line([(x, bottom), (x, bottom + 4)], fill=AXIS)
        draw.text((x, bottom + 6), f"{step:.0f}", fill=AXIS, font=font, anchor="mt")
    draw.rectangle([panel.left, panel.top, right, bottom], outline=AXIS)
    draw.text((panel.left, panel.top - 4), title, fill=AXIS, font=font, anchor="lb")


def draw_series(draw: ImageDraw.ImageDraw, panel: Panel, series: Series, colour: tuple[int, int, int]) -> None:
    points = [panel.point(s, v) for s, v in zip(series.steps, series.values, strict=True)]
    if len(points) > 1:
        draw.line(points, fill=colour, width=1 if len(points) > 100 else 2)
    if len(points) <= 100:
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)


def plot_metrics(losses: list[Series], learning_rate: Series | None) -> Image.Image:
    """The losses over steps (one panel, shared scale) above the learning rate over steps."""
    shown = [s for s in losses if s.steps]
    panels = 2 if learning_rate is not None and learning_rate.steps else 1
    height = MARGIN + panels * (PANEL + GAP) + MARGIN
    image = Image.new("RGB", (WIDTH, height), PAPER)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11)
    every = [*shown, *([learning_rate] if panels == 2 and learning_rate is not None else [])]
    steps = [s for series in every for s in series.steps]
    x_range = (float(min(steps)), float(max(steps)))
    top = Panel(MARGIN_LEFT, MARGIN + 10, WIDTH - MARGIN_LEFT - MARGIN, PANEL - 10, x_range, value_range(shown))
    draw_panel(draw, top, "loss by step", font)
    for i, series in enumerate(shown):
        colour = COLOURS.get(series.name, (80, 80, 80))
        draw_series(draw, top, series, colour)
        draw.text((top.left + top.width - 4, top.top + 4 + 14 * i), series.name, fill=colour, font=font, anchor="ra")
    if panels == 2 and learning_rate is not None:
        y = MARGIN + PANEL + GAP + 10
        bottom = Panel(MARGIN_LEFT, y, top.width, PANEL - 10, x_range, value_range([learning_rate]))
        draw_panel(draw, bottom, "learning rate by step", font)
        draw_series(draw, bottom, learning_rate, LR_COLOUR)
    return image
