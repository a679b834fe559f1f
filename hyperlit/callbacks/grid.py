"""Preview grid images: cells pasted edge to edge, and the labelled version with prompts (rows) and multipliers
(columns) drawn around them with PIL's default font, the way A1111's X/Y plot labels its axes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

INK = (0, 0, 0)
PAPER = (255, 255, 255)


def grid_caption(prompts: Sequence[str], multipliers: Sequence[float]) -> str:
    rows = " | ".join(f"{i + 1}: {p}" for i, p in enumerate(prompts))
    return f"rows (prompts) {rows}; columns: multiplier {', '.join(f'{m:g}' for m in multipliers)}"


def paste_grid(cells: list[list[Image.Image]]) -> Image.Image:
    """Rows of equally sized images as one image."""
    width, height = cells[0][0].size
    grid = Image.new("RGB", (width * len(cells[0]), height * len(cells)))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell, (c * width, r * height))
    return grid


@dataclass(frozen=True)
class GridLayout:
    """Where the cells sit in a labelled grid: the prompt strip's width on the left, the header's height on top."""

    left: int
    top: int
    font_size: int


def layout_for(cell_height: int) -> GridLayout:
    # 10 px text under 64 px cells (the tiny model), growing with the cells so a 512 px grid stays readable
    font_size = max(10, cell_height // 12)
    return GridLayout(left=font_size * 14, top=font_size * 2, font_size=font_size)


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float, max_lines: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width``; the last line ends with "..." if cut."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(f"{last}...") > width:
            last = last[:-1]
        lines[-1] = f"{last}..."
    return lines


def label_grid(cells: list[list[Image.Image]], prompts: Sequence[str], multipliers: Sequence[float]) -> Image.Image:
    """``paste_grid(cells)`` on white, with each row's prompt on its left and each column's multiplier above it."""
    width, height = cells[0][0].size
    layout = layout_for(height)
    bare = paste_grid(cells)
    grid = Image.new("RGB", (layout.left + bare.width, layout.top + bare.height), PAPER)
    grid.paste(bare, (layout.left, layout.top))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=layout.font_size)
    line_height = layout.font_size + 2
    margin = layout.font_size // 2
    draw.text((margin, layout.top // 2), "multiplier", fill=INK, font=font, anchor="lm")
    for c, m in enumerate(multipliers):
        draw.text((layout.left + c * width + width // 2, layout.top // 2), f"{m:g}", fill=INK, font=font, anchor="mm")
    for r, prompt in enumerate(prompts):
        lines = wrap(prompt or "(empty prompt)", font, layout.left - 2 * margin, max(1, height // line_height))
        y = layout.top + r * height + (height - len(lines) * line_height) // 2
        for i, line in enumerate(lines):
            draw.text((margin, y + i * line_height), line, fill=INK, font=font)
    return grid
