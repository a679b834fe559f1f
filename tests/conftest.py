"""Shared test set-up: offline, no wandb server, and Hydra configs composed from conf/."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def compose_config(config_name: str = "train", overrides: list[str] | None = None):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable:
    """Compose conf/train.yaml for a short CPU run writing into tmp_path."""

    def make(*overrides: str, steps: int = 4):
        base = [
            f"paths.output_dir={tmp_path / 'run'}",
            "logger=none",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.max_steps={steps}",
            "~callbacks.progress",
            "trainer.enable_progress_bar=false",
            "callbacks.preview.steps=2",
        ]
        return compose_config("train", base + list(overrides))

    return make
