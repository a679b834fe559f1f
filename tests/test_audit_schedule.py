"""Audit (issue 14): A1111 schedule steps must strictly increase (a repeated boundary is refused), and the
schedule edges and messages that mutation testing found unguarded."""

from __future__ import annotations

import pytest
import torch

from hyperlit.lr_schedule import A1111Schedule, base_learning_rate, build_scheduler, is_a1111_schedule


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


def test_rate_zero_is_refused():
    with pytest.raises(ValueError, match=r"rate 0.0 in '0:100' is not allowed; rates are > 0"):
        A1111Schedule.parse("0:100", max_steps=1000)


def test_a_step_equal_to_max_steps_ends_the_list():
    # until == max_steps lasts until the end exactly like -1: later items are never reached
    assert A1111Schedule.parse("1e-5:100, 1e-6:200", max_steps=100).segments == ((1e-5, 100),)


def test_resume_message_quotes_the_schedule_text():
    schedule = A1111Schedule.parse("5e-5:10, 5e-6:20", max_steps=100)
    assert schedule.text == "5e-5:10, 5e-6:20"
    with pytest.raises(ValueError) as err:
        schedule.check_resume(20)
    assert str(err.value) == (
        "train.learning_rate: the schedule '5e-5:10, 5e-6:20' ends at step 20, but training resumes at step 20; "
        "nothing is left to train (extend the schedule to continue)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e-5:10:20", "train.learning_rate: '1e-5:10:20' is not an A1111 schedule; use 'RATE' or "
         "'RATE:UNTIL_STEP, ...', e.g. '5e-5:100, 5e-6:1500'"),
        ("1e-5:x", "train.learning_rate: item '1e-5:x' of '1e-5:x' is not RATE:UNTIL_STEP (a number and a whole step "
         "count, e.g. 5e-6:1500)"),
        ("1e-5:100, 1e-6:100", "train.learning_rate: step 100 in '1e-5:100, 1e-6:100' is not allowed; steps must be "
         "positive and increasing (or -1 for 'until the end')"),
    ],
)  # fmt: skip
def test_schedule_errors_are_the_documented_messages(text, message):
    # the message is the user interface: key, value and what is allowed, word for word
    with pytest.raises(ValueError) as err:
        A1111Schedule.parse(text, max_steps=1000)
    assert str(err.value) == message


def test_a_comma_list_of_bare_rates_is_a_schedule_string():
    assert is_a1111_schedule("2e-5, 1e-6") and is_a1111_schedule("2e-5:10") and not is_a1111_schedule("2e-5")
    assert base_learning_rate("2e-5, 1e-6", 10) == 2e-5  # the first bare rate lasts until the end


def _lrs(lr, scheduler: str, warmup: int, max_steps: int, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_learning_rate(lr, max_steps))
    sched = build_scheduler(optimizer, lr, scheduler, warmup, max_steps)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return seen


def test_past_the_end_of_a_string_the_last_rate_is_kept():
    assert _lrs("1e-3:2, 1e-4:4, 1e-5:5", "constant", 0, 10, 7) == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5]
    )


def test_constant_with_warmup_and_linear_without_warmup():
    assert _lrs(1.0, "constant", 2, 10, 4) == pytest.approx([0.0, 0.5, 1.0, 1.0])  # constant -> with warm-up
    assert _lrs(1.0, "linear", 0, 4, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])  # warm-up 0 is allowed


def test_scheduler_errors_are_the_documented_messages():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError) as err:
        build_scheduler(optimizer, 1.0, "linear", -1, 10)
    assert str(err.value) == "train.lr_warmup_steps: -1 is not allowed; use 0 or more"
    with pytest.raises(ValueError) as err:
        build_scheduler(optimizer, 1.0, "exotic", 0, 10)
    assert str(err.value) == (
        "train.lr_scheduler: 'exotic' is not supported; allowed: constant, linear, cosine, cosine_with_restarts, "
        "polynomial, constant_with_warmup"
    )
    with pytest.raises(ValueError) as err:
        build_scheduler(optimizer, "1e-3:5", "constant", 2, 10)
    assert str(err.value) == (
        "train.lr_scheduler='constant' / train.lr_warmup_steps=2: an A1111 schedule string in train.learning_rate "
        "sets the rates itself; use lr_scheduler=constant and lr_warmup_steps=0"
    )
