"""The end-of-epoch bad-input line: the first epoch always, later epochs only when they met new bad input."""

from __future__ import annotations

import logging

import torch

from hyperlit.data.skips import SkipLog
from hyperlit.data.stream import EpochLoader


def epoch_lines(caplog: logging.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and "done; bad input so far" in r.getMessage()]


def test_the_epoch_line_is_said_once_and_again_only_when_new_bad_input_comes(caplog):
    epoch = [0]
    skips = SkipLog(verbose=False)
    loader = EpochLoader([{"x": torch.zeros(1)}] * 3, epoch_fn=lambda: epoch[0], skips=skips)
    with caplog.at_level(logging.DEBUG, logger="hyperlit.data.stream"):
        for e in range(6):
            epoch[0] = e
            if e == 3:
                skips.add("zero_byte", "a.png")  # what a worker's report merges in during epoch 3
            assert len(list(loader)) == 3
    assert epoch_lines(caplog, logging.INFO) == [
        "data: epoch 0 done; bad input so far: no bad input",
        "data: epoch 3 done; bad input so far: zero_byte=1 (skipped)",
    ]
    quiet = epoch_lines(caplog, logging.DEBUG)  # the unchanged epochs are still there for --verbose debugging
    assert [line.split(" done")[0] for line in quiet] == [
        "data: epoch 1",
        "data: epoch 2",
        "data: epoch 4",
        "data: epoch 5",
    ]
