"""Shared test set-up: offline, no wandb server, and the fixtures many test files use (composed configs, tiny
models, image folders). Helpers that are not fixtures live in tests/helpers/ (on sys.path via pyproject's
pytest `pythonpath`), and no test module imports this file."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from diffusers import AutoencoderKL
from helpers.config import QUIET_RUN, compose_config
from helpers.images import make_folder
from helpers.models import make_tiny_vae

from hyperlit.models import SDComponents, load_components

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Console handlers that libraries add when imported (Lightning's on the `lightning` logger, diffusers' and
    transformers' on theirs) hold the sys.stderr of that moment: the first session's capture, which pytest closes at
    that session's end. A second pytest session in the same process (mutmut runs its stats pass and then its clean
    run that way, and forks every mutant from that process) then logs into a closed file, and "--- Logging error
    ---" tracebacks land in the stderr tests read. Such handlers get this session's stderr, as the first had."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
                with handler.lock:  # not setStream(): it flushes the closed file first
                    handler.stream = sys.stderr
                handler.__dict__.pop("flush", None)  # diffusers and transformers pin the old stream's flush


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable:
    """Compose conf/train.yaml for a short CPU run writing into tmp_path."""

    def make(*overrides: str, steps: int = 4):
        base = [
            f"paths.output_dir={tmp_path / 'run'}",
            *QUIET_RUN,
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.max_steps={steps}",
            "callbacks.preview.steps=2",
            # the demo recipe exports the weights' EMA; these runs check files against the live weights (the EMA
            # has its own tests, tests/test_hypernetwork_ema.py)
            "callbacks.ema.enabled=false",
        ]
        return compose_config("train", base + list(overrides))

    return make


@pytest.fixture
def vae_cfg(tmp_path: Path) -> Callable:
    """Compose conf/vae.yaml for a short CPU run writing into tmp_path."""

    def make(*overrides: str, steps: int = 3):
        base = [f"paths.output_dir={tmp_path / 'run'}", *QUIET_RUN, f"train.max_steps={steps}"]
        return compose_config("vae", base + list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_components() -> SDComponents:
    """The embedded tiny SD model (conf/model/tiny.yaml defaults), built once: tests must not change it."""
    return load_components(family="tiny")


@pytest.fixture
def tiny_vae() -> AutoencoderKL:
    """A fresh tiny AutoencoderKL (helpers.models.TINY_VAE, seed 0) that a test may train or modify."""
    return make_tiny_vae()


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """image_folder(n, size): a new folder under tmp_path of n solid-colour PNGs with captions (helpers.images)."""
    count = 0

    def make(n: int = 6, size: tuple[int, int] = (64, 64)) -> Path:
        nonlocal count
        count += 1
        return make_folder(tmp_path / f"images{count}", n=n, size=size)

    return make
