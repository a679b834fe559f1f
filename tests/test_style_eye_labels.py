"""The style judge against labels given by eye to generated images: is the learning proof's style score honest?

tests/data/style_eye_labels holds 160 tiles the learning proof generated for held-out prompts with the demo
recipe's hypernetworks (training seeds 42, 1, 2, 3, 4; 120 tiles at multiplier 1, 40 at multiplier 0), shuffled,
and one label pair per tile written by a labeller who saw only the tiles and two images of the sample set as the
reference. The labeller was not shown scores, multipliers or the goal. Labels:

- style: "yes" (a person comparing with the reference would say the background is in its style), "partly" (some of
  it, but one would hesitate: faint, tinted, broken up) or "no" (plain or another kind of pattern);
- regular: "yes" when the squares alternate like a chessboard over most of the background.

What a fair judge must do with them: never call the style where the eye saw none, find nearly every tile the eye
called in the style, and report a share that lies between the eye's confident share ("yes") and its generous one
("yes" or "partly"). A stricter judge would hide learning; a more lenient one would flatter the demo.
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from hyperlit.demo.shapes import judge

DATA = Path(__file__).parent / "data" / "style_eye_labels"
TILE = 64
COLUMNS = 16


@cache  # every test reads the same 160 judgements: judge them once
def labelled_tiles() -> list[tuple[dict[str, str], bool]]:
    """(label row, the judge's style call) for every tile, in the labels file's order."""
    sheet = np.asarray(Image.open(DATA / "tiles.png").convert("RGB"))
    with open(DATA / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        i = int(row["tile"])
        y, x = (i // COLUMNS) * TILE, (i % COLUMNS) * TILE
        out.append((row, judge(sheet[y : y + TILE, x : x + TILE]).checker))
    return out


def test_the_label_set_is_complete_and_blind_to_the_multiplier():
    rows = [row for row, _ in labelled_tiles()]
    assert sorted(int(r["tile"]) for r in rows) == list(range(160))
    assert sum(r["multiplier"] == "1" for r in rows) == 120
    assert {r["training_seed"] for r in rows} == {"42", "1", "2", "3", "4"}
    # the tiles are shuffled: multiplier-0 tiles are spread over the sheet, not gathered at one end
    zero = [int(r["tile"]) for r in rows if r["multiplier"] == "0"]
    assert min(zero) < 20 and max(zero) > 140


def test_the_judge_never_calls_the_style_where_the_eye_saw_none():
    missed = [row["tile"] for row, called in labelled_tiles() if row["style"] == "no" and called]
    assert not missed, f"judged in the style, labelled plain or another pattern: tiles {missed}"


def test_the_judge_finds_nearly_every_tile_the_eye_called_in_the_style():
    cases = labelled_tiles()
    style_yes = [called for row, called in cases if row["style"] == "yes"]
    regular = [called for row, called in cases if row["regular"] == "yes"]
    assert len(style_yes) >= 40 and len(regular) >= 30
    assert np.mean(style_yes) >= 0.85, np.mean(style_yes)  # measured: 46 of 52
    assert np.mean(regular) >= 0.85, np.mean(regular)  # measured: 33 of 38


def test_the_judges_share_lies_between_the_eyes_confident_and_generous_shares():
    cases = labelled_tiles()
    at_one = [(row, called) for row, called in cases if row["multiplier"] == "1"]
    judged = np.mean([called for _, called in at_one])
    confident = np.mean([row["style"] == "yes" for row, _ in at_one])
    generous = np.mean([row["style"] in ("yes", "partly") for row, _ in at_one])
    # measured: eye 0.43 (yes) and 0.99 (yes or partly); judge 0.65
    assert confident + 0.1 <= judged <= generous - 0.1, (confident, judged, generous)
    # and at multiplier 0 (the base alone) neither the eye nor the judge sees the style
    at_zero = [(row, called) for row, called in cases if row["multiplier"] == "0"]
    assert not any(called or row["style"] != "no" for row, called in at_zero)
