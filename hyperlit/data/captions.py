"""Captions and prompt templates with the semantics of A1111's textual-inversion/hypernetwork dataset.

A prompt is a template line with `[filewords]` replaced by the image caption and `[name]` by the network
name. Tags are the caption split on ","; drop-out removes each with probability p, shuffling reorders them,
and they are re-joined with "," exactly as A1111 does (no space added). Without shuffle or drop-out the
template line is chosen once per image and reused for the whole run.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from hyperlit.data.paths import repo_root, resolve_path

TEMPLATE_NAMES = ("hypernetwork", "style", "style_filewords", "subject", "subject_filewords", "none")
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")


def templates_dir() -> Path:
    return repo_root() / "conf" / "templates"


def load_template(template: str) -> list[str]:
    """Template lines from a shipped name (`style_filewords`) or a path to a text file.

    Lines are stripped like A1111's; blank lines are dropped (A1111 could pick them, giving an empty prompt).
    """
    shipped = templates_dir() / f"{template}.txt"
    if "/" not in template and "\\" not in template and not template.endswith(".txt") and shipped.is_file():
        path = shipped
    else:
        path = resolve_path(template, "data.template", allowed=f"one of {', '.join(TEMPLATE_NAMES)} or a file")
        if not path.is_file():
            raise FileNotFoundError(f"data.template={template!r}: {path} is not a file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"data.template={template!r}: {path} has no non-blank lines")
    return lines


def filename_caption(stem: str) -> str:
    """A1111's caption when there is no .txt: the file stem without leading digits and dashes."""
    return _LEADING_NUMBERS.sub("", stem)


def decode_caption(data: bytes) -> tuple[str, bool]:
    """UTF-8 text (BOM removed, surrounding whitespace stripped); bool is True when bytes had to be replaced."""
    try:
        return data.decode("utf-8-sig").strip(), False
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", errors="replace").strip(), True


def make_prompt(
    lines: list[str], caption: str, name: str, rng: random.Random, shuffle_tags: bool, tag_dropout: float
) -> str:
    """One prompt; consumes `rng` in A1111's order: line choice, one draw per tag for drop-out, shuffle."""
    text = rng.choice(lines)
    tags = caption.split(",")
    if tag_dropout != 0:
        tags = [t for t in tags if rng.random() > tag_dropout]
    if shuffle_tags:
        rng.shuffle(tags)
    return text.replace("[filewords]", ",".join(tags)).replace("[name]", name)


def varies_per_step(shuffle_tags: bool, tag_dropout: float) -> bool:
    return bool(shuffle_tags) or tag_dropout != 0
