"""The default run learns the sample set's style: a weaker form of benchmarks/learning_proof.py's goal."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def learning_proof():
    spec = importlib.util.spec_from_file_location("learning_proof", REPO / "benchmarks" / "learning_proof.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skip(
    reason="known gap (issue 10 open): the committed tiny base is undertrained (held-out adherence 0.12, goal 0.8), "
    "so the default run cannot show the style yet; run benchmarks/learning_proof.py once better weights are committed"
)
def test_default_run_moves_held_out_prompts_into_the_style(tmp_path):
    lp = learning_proof()
    hypernetwork, _ = lp.train_default(tmp_path / "run", ["logger=none", f"data.cache_dir={tmp_path / 'cache'}"])
    scores = lp.prove(hypernetwork, seeds=3, steps=20, cfg=5.0, sheet=None)
    base, styled = scores[0.0], scores[1.0]
    assert base.style <= 0.35, base  # the base does not draw the checkered style by itself
    assert styled.style >= base.style + 0.3, (base, styled)  # the hypernetwork does
    assert styled.adherence >= 0.5, styled  # and the prompt's colour and shape survive
