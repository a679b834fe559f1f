"""cpu_threads: the runner runs small models on the CPU with 1 intra-op thread (fast next to busy processes,
benchmarks/demo_under_load.py), leaves real models and OMP_NUM_THREADS alone, and takes the user's number."""

from __future__ import annotations

import pytest
import torch

from hyperlit import models
from hyperlit.cpu_threads import SMALL_MODEL_THREADS, apply_threads, choose_threads, runs_on_cpu
from hyperlit.runner import build_run


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("setting", "on_cpu", "family", "env", "expected"),
    [
        ("auto", True, "tiny", {}, SMALL_MODEL_THREADS),
        ("auto", True, "tiny_sdxl", {}, SMALL_MODEL_THREADS),
        (None, True, "tiny", {}, SMALL_MODEL_THREADS),
        ("auto", True, "sd15", {}, None),  # a real model's ops are large: torch's default (one per core)
        ("auto", False, "tiny", {}, None),  # GPU runs: the CPU threads only feed the GPU
        ("auto", True, "tiny", {"OMP_NUM_THREADS": "2"}, None),  # the user's shell setting wins over auto
        (3, True, "tiny", {"OMP_NUM_THREADS": "2"}, 3),  # and cpu_threads wins over both
        (2, False, "sd15", {}, 2),
    ],
)
def test_the_choice(setting, on_cpu, family, env, expected) -> None:
    assert choose_threads(setting, on_cpu, family, env).threads == expected


def test_cpu_is_decided_from_the_trainer_config() -> None:
    assert runs_on_cpu({"accelerator": "cpu"})
    assert not runs_on_cpu({"accelerator": "gpu"})
    assert runs_on_cpu({"accelerator": "auto"}) == (
        not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )


def test_the_runner_sets_one_thread_for_the_tiny_model_and_the_users_number(
    train_cfg, monkeypatch, threads_restored
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    build_run(train_cfg("trainer.accelerator=cpu"))
    assert torch.get_num_threads() == 1
    build_run(train_cfg("trainer.accelerator=cpu", "cpu_threads=2"))
    assert torch.get_num_threads() == 2
    apply_threads(choose_threads("auto", True, "sd15", {}))  # nothing to set: unchanged
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, True])
def test_a_bad_value_is_an_error_at_the_door(train_cfg, monkeypatch, value, threads_restored) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was raised")

    monkeypatch.setattr(models, "load_components", refuse)
    with pytest.raises(ValueError, match=r"cpu_threads: .* is not allowed; use auto or a whole number >= 1"):
        build_run(train_cfg(f"cpu_threads={value}"))
