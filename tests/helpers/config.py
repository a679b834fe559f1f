"""Compose the project's Hydra configs from conf/ the way train.py does, without running anything."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from helpers.paths import CONF_DIR

# Overrides that keep a run quiet and local: no logger, no progress bar (both top-level configs take them).
QUIET_RUN = ["logger=none", "~callbacks.progress", "trainer.enable_progress_bar=false"]


def compose_config(config_name: str | None = "train", overrides: list[str] | None = None, **kwargs) -> DictConfig:
    """conf/<config_name>.yaml with Hydra overrides; kwargs go to hydra.compose (e.g. return_hydra_config)."""
    GlobalHydra.instance().clear()  # a test that left Hydra initialised must not break the next one
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [], **kwargs)
