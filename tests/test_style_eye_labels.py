"""The style judge against labels given by eye to generated images: is the learning proof's style score honest?

Two label sets, each 160 tiles the learning proof generated for held-out prompts with the demo recipe's hypernetworks
of one round (training seeds 42, 1, 2, 3, 4; 120 tiles at multiplier 1, 40 at multiplier 0), shuffled, and one label
pair per tile written by a labeller who saw only the tiles and two images of the sample set as the reference. The
labeller was not shown scores, multipliers or the goal.

- tests/data/style_eye_labels: the grey-165 checker, every timestep (the recipe before 2026-11-30's second round);
- tests/data/style_eye_labels_lighter: the grey-190 checker, timesteps 250 and up (the recipe since).

Labels:

- style: "yes" (a person comparing with the reference would say the background is in its style), "partly" (some of
  it, but one would hesitate: faint, tinted, broken up) or "no" (plain or another kind of pattern);
- regular: "yes" when the squares alternate like a chessboard over most of the background.

What a fair judge must do with them: never call the style where the eye saw none, find nearly every tile the eye
called in the style, and report a share that lies between the eye's confident share ("yes") and its generous one
("yes" or "partly"). A stricter judge would hide learning; a more lenient one would flatter the demo.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperlit.demo.shapes import judge

DATA = Path(__file__).parent / "data"
TILE = 64
COLUMNS = 16


@dataclass(frozen=True)
class LabelSet:
    folder: str
    min_recall: float  # share of the tiles the eye called in the style ("yes") that the judge calls so
    min_recall_regular: float  # the same for the tiles the eye called a regular chessboard
    min_lead: float  # the judge's share at multiplier 1 lies at least this far above the eye's confident share
    zero_partly: int  # multiplier-0 tiles the eye called "partly" (never "yes")


LABEL_SETS = [
    # measured: recall 46 of 52 (yes) and 33 of 38 (regular); eye 0.43 (yes) and 0.99 (yes or partly), judge 0.65
    LabelSet("style_eye_labels", min_recall=0.85, min_recall_regular=0.85, min_lead=0.1, zero_partly=0),
    # measured: recall 58 of 74 (yes) and 76 of 109 (regular); eye 0.62 and 0.98, judge 0.64. On the lighter checker
    # the judge is about as strict as the eye's confident call: the checkers it misses are broken up (cells that
    # merge, or the two parities meeting at a seam), which one correlation over the whole background does not
    # forgive. At multiplier 0 the eye called 4 of the base's 40 tiles "partly" (a faint blockiness of their white
    # backgrounds); the judge called none.
    LabelSet("style_eye_labels_lighter", min_recall=0.75, min_recall_regular=0.65, min_lead=0.0, zero_partly=4),
]


@cache  # every test reads the same 160 judgements of a set: judge them once
def labelled_tiles(folder: str) -> list[tuple[dict[str, str], bool]]:
    """(label row, the judge's style call) for every tile, in the labels file's order."""
    sheet = np.asarray(Image.open(DATA / folder / "tiles.png").convert("RGB"))
    with open(DATA / folder / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        i = int(row["tile"])
        y, x = (i // COLUMNS) * TILE, (i % COLUMNS) * TILE
        out.append((row, judge(sheet[y : y + TILE, x : x + TILE]).checker))
    return out


@pytest.mark.parametrize("labels", LABEL_SETS, ids=lambda s: s.folder)
def test_the_label_set_is_complete_and_blind_to_the_multiplier(labels):
    rows = [row for row, _ in labelled_tiles(labels.folder)]
    assert sorted(int(r["tile"]) for r in rows) == list(range(160))
    assert sum(r["multiplier"] == "1" for r in rows) == 120
    assert {r["training_seed"] for r in rows} == {"42", "1", "2", "3", "4"}
    # the tiles are shuffled: multiplier-0 tiles are spread over the sheet, not gathered at one end
    zero = [int(r["tile"]) for r in rows if r["multiplier"] == "0"]
    assert min(zero) < 20 and max(zero) > 140


@pytest.mark.parametrize("labels", LABEL_SETS, ids=lambda s: s.folder)
def test_the_judge_never_calls_the_style_where_the_eye_saw_none(labels):
    missed = [row["tile"] for row, called in labelled_tiles(labels.folder) if row["style"] == "no" and called]
    assert not missed, f"judged in the style, labelled plain or another pattern: tiles {missed}"


@pytest.mark.parametrize("labels", LABEL_SETS, ids=lambda s: s.folder)
def test_the_judge_finds_nearly_every_tile_the_eye_called_in_the_style(labels):
    cases = labelled_tiles(labels.folder)
    style_yes = [called for row, called in cases if row["style"] == "yes"]
    regular = [called for row, called in cases if row["regular"] == "yes"]
    assert len(style_yes) >= 40 and len(regular) >= 30
    assert np.mean(style_yes) >= labels.min_recall, np.mean(style_yes)
    assert np.mean(regular) >= labels.min_recall_regular, np.mean(regular)


@pytest.mark.parametrize("labels", LABEL_SETS, ids=lambda s: s.folder)
def test_the_judges_share_lies_between_the_eyes_confident_and_generous_shares(labels):
    cases = labelled_tiles(labels.folder)
    at_one = [(row, called) for row, called in cases if row["multiplier"] == "1"]
    judged = np.mean([called for _, called in at_one])
    confident = np.mean([row["style"] == "yes" for row, _ in at_one])
    generous = np.mean([row["style"] in ("yes", "partly") for row, _ in at_one])
    assert confident + labels.min_lead <= judged <= generous - 0.1, (confident, judged, generous)
    # and at multiplier 0 (the base alone) the judge never sees the style, nor does the eye say "yes"
    at_zero = [(row, called) for row, called in cases if row["multiplier"] == "0"]
    assert not any(called or row["style"] == "yes" for row, called in at_zero)
    assert sum(row["style"] == "partly" for row, _ in at_zero) == labels.zero_partly
