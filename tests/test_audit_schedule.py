"""Audit (issue 14): A1111 schedule steps must strictly increase; a repeated boundary is refused."""

from __future__ import annotations

import pytest

from hyperlit.lr_schedule import A1111Schedule


@pytest.mark.parametrize("text", ["1e-5:100, 1e-6:100", "1e-4:10, 1e-5:20, 1e-6:20"])
def test_a_repeated_step_boundary_is_refused(text):
    # A1111 would train zero steps at the second rate: a typo, not a schedule. "Increasing" means strictly.
    with pytest.raises(ValueError, match=r"train.learning_rate: step (100|20) in .* positive and increasing"):
        A1111Schedule.parse(text, max_steps=1000)


def test_the_smallest_valid_increase_is_accepted():
    # boundary one step later than the previous one: the check is `<=`, not `< previous + 1` or similar
    assert A1111Schedule.parse("1e-5:100, 1e-6:101", max_steps=1000).segments == ((1e-5, 100), (1e-6, 101))


def test_step_zero_is_refused_and_step_one_accepted():
    with pytest.raises(ValueError, match="step 0 in"):
        A1111Schedule.parse("1e-5:0", max_steps=10)
    assert A1111Schedule.parse("1e-5:1", max_steps=10).segments == ((1e-5, 1),)
