"""A1111 learning-rate strings and the warmup schedules."""

from __future__ import annotations

import pytest
import torch

from hyperlit.lr_schedule import A1111Schedule, base_learning_rate, build_scheduler


def test_spec_example_trains_1500_steps_then_stops():
    schedule = A1111Schedule.parse("5e-5:100, 5e-6:1500", max_steps=100000)
    assert schedule.segments == ((5e-5, 100), (5e-6, 1500))
    assert schedule.total_steps == 1500  # training stops when the list is exhausted, not at max steps
    assert schedule.rate_at(0) == 5e-5 and schedule.rate_at(99) == 5e-5
    assert schedule.rate_at(100) == 5e-6 and schedule.rate_at(1499) == 5e-6
    assert schedule.rate_at(1500) is None


def test_bare_rate_and_minus_one_last_until_max_steps():
    assert A1111Schedule.parse("1e-5", max_steps=300).segments == ((1e-5, 300),)
    schedule = A1111Schedule.parse("1e-4:10, 1e-5:-1, 1e-6:5000", max_steps=300)
    assert schedule.segments == ((1e-4, 10), (1e-5, 300))  # -1 ends parsing
    assert schedule.total_steps == 300


def test_steps_beyond_max_are_clipped_and_end_parsing():
    schedule = A1111Schedule.parse("1e-4:50, 1e-5:1000, 1e-6:2000", max_steps=200)
    assert schedule.segments == ((1e-4, 50), (1e-5, 200))


def test_whitespace_and_scientific_notation_are_accepted():
    schedule = A1111Schedule.parse("  0.005 : 20 ,1E-3:40", max_steps=100)
    assert schedule.segments == ((0.005, 20), (1e-3, 40))


def test_resume_skips_finished_segments_and_refuses_an_exhausted_schedule():
    schedule = A1111Schedule.parse("5e-5:100, 5e-6:1500", max_steps=100000)
    schedule.check_resume(120)
    assert schedule.rate_at(120) == 5e-6
    with pytest.raises(ValueError, match="ends at step 1500.*resumes at step 1500"):
        schedule.check_resume(1500)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("fast", "not RATE:UNTIL_STEP"),
        ("1e-5:1e3", "not RATE:UNTIL_STEP"),  # int() of the step, as in A1111
        ("1e-5:10:20", "not an A1111 schedule"),
        ("1e-5:100, 1e-6:50", "positive and increasing"),
        ("-1e-5:100", "rates are > 0"),
    ],
)
def test_malformed_strings_name_the_key_and_the_syntax(text, fragment):
    with pytest.raises(ValueError) as err:
        A1111Schedule.parse(text, max_steps=1000)
    assert "train.learning_rate" in str(err.value) and fragment in str(err.value)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_scheduler_follows_the_string_step_by_step():
    param = torch.nn.Parameter(torch.zeros(1))
    lr = "1e-3:2, 1e-4:4, 1e-5:5"
    optimizer = torch.optim.AdamW([param], lr=base_learning_rate(lr, 10))
    scheduler = build_scheduler(optimizer, lr, "constant", 0, max_steps=10)
    assert _lrs(scheduler, optimizer, 5) == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


def test_warmup_cosine_matches_the_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, 1.0, "cosine", warmup_steps=2, max_steps=6)
    import math

    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)]
    assert _lrs(scheduler, optimizer, 6) == pytest.approx(expected)


def test_a_string_with_a_warmup_scheduler_is_refused():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    with pytest.raises(ValueError, match="train.lr_scheduler='cosine'"):
        build_scheduler(optimizer, "1e-3:5", "cosine", 0, max_steps=10)
    with pytest.raises(ValueError, match="train.lr_scheduler: 'exotic' is not supported; allowed: constant"):
        build_scheduler(optimizer, 1e-3, "exotic", 0, max_steps=10)


def test_base_learning_rate_validates_numbers():
    assert base_learning_rate(1e-5, 10) == 1e-5
    assert base_learning_rate("2e-5", 10) == 2e-5
    with pytest.raises(ValueError, match="train.learning_rate: 0 is not allowed"):
        base_learning_rate(0, 10)
    with pytest.raises(ValueError, match="neither a number nor an A1111 schedule"):
        base_learning_rate("quick", 10)
