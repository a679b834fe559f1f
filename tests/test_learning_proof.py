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
    scores = lp.prove(hypernetwork, seeds=8, steps=20, cfg=5.0, sheet=None)  # the benchmark's 32 samples
    base, styled = scores[0.0], scores[1.0]
    assert base.style <= 0.2 and base.adherence >= 0.6, base  # the base draws the prompt, not the style
    # the full goal (style >= 0.7 with adherence >= 0.7) is half met: style 0.59, adherence 0.72, colour 0.94
    # (docs/benchmarks.md). The lines sit between that and the previous recipe (no tag dropout: adherence 0.38,
    # colour 0.75), which fails them; 3 seeds (12 samples, 0.75 vs 0.58) were too few to separate the two.
    assert styled.style >= base.style + 0.45, (base, styled)  # the hypernetwork adds the style
    assert styled.adherence >= 0.6 and styled.colour >= 0.85, styled  # and keeps the prompt's colour and shape
