"""Audit (issue 14): the hypernetwork task's checkpoint carries the torch RNG state and restores it after
Lightning's own set-up, so a resumed run draws what the uninterrupted run would have drawn (fast, no fit)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.tasks.hypernetwork.module import HypernetworkTask


def task() -> HypernetworkTask:
    hn = Hypernetwork(HypernetworkConfig(), sizes=[48, 32])
    # the RNG hooks need no model: a plain object with the family's prediction type stands in for SDComponents
    return HypernetworkTask(hn, SimpleNamespace(prediction_type="epsilon"), functools.partial(torch.optim.AdamW))


def test_rng_state_round_trips_through_the_checkpoint_hooks():
    torch.manual_seed(1234)
    torch.rand(3)  # somewhere in the middle of a run
    checkpoint: dict = {}
    task().on_save_checkpoint(checkpoint)
    uninterrupted = torch.rand(16)  # what the run draws next

    torch.manual_seed(999)  # a new process: another state
    resumed = task()
    resumed.on_load_checkpoint(checkpoint)
    torch.rand(5)  # Lightning's set-up after loading the checkpoint may draw random numbers
    resumed.on_train_start()
    assert torch.equal(torch.rand(16), uninterrupted)


def test_rng_is_restored_once_only():
    checkpoint: dict = {}
    torch.manual_seed(5)
    task().on_save_checkpoint(checkpoint)
    first = torch.rand(4)
    resumed = task()
    resumed.on_load_checkpoint(checkpoint)
    resumed.on_train_start()
    assert torch.equal(torch.rand(4), first)
    after = torch.get_rng_state()
    resumed.on_train_start()  # a second fit() on the same module must not rewind the generator again
    assert torch.equal(torch.get_rng_state(), after)


def test_a_checkpoint_without_rng_state_leaves_the_generator_alone():
    resumed = task()
    resumed.on_load_checkpoint({})
    torch.manual_seed(7)
    state = torch.get_rng_state()
    resumed.on_train_start()
    assert torch.equal(torch.get_rng_state(), state)
