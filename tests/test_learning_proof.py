"""The default run learns the sample set's style: a weaker form of benchmarks/learning_proof.py's goal."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def learning_proof():
    return load_script(REPO / "benchmarks" / "learning_proof.py")


@pytest.mark.slow
def test_default_run_moves_held_out_prompts_into_the_style(tmp_path):
    lp = learning_proof()
    hypernetwork, _ = lp.train_default(tmp_path / "run", ["logger=none", f"data.cache_dir={tmp_path / 'cache'}"])
    scores = lp.prove(hypernetwork, seeds=3, steps=20, cfg=5.0, sheet=None)
    base, styled = scores[0.0], scores[1.0]
    assert base.style <= 0.2 and base.adherence >= 0.6, base  # the base draws the prompt, not the style
    assert styled.style >= base.style + 0.3, (base, styled)  # the hypernetwork adds the style
    # the goal (adherence >= 0.7 with the style) is not met yet: the default run keeps the colour in most
    # samples but loses the shape in about half (docs/benchmarks.md); this pins that it does not get worse
    assert styled.adherence >= 0.2 and styled.colour >= 0.5, styled
