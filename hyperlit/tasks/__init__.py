"""The tasks ``python train.py`` can run, by ``cfg.task``: each is a package with ``module.py`` and ``build.py``."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from hyperlit.tasks.base import TaskParts
from hyperlit.tasks.hypernetwork import build as hypernetwork
from hyperlit.tasks.taesd import build as taesd
from hyperlit.tasks.vae import build as vae

# Registering a task is one line: its name and its build function.
TASKS: dict[str, Callable[[DictConfig], TaskParts]] = {
    "hypernetwork": hypernetwork.build,
    "vae": vae.build,
    "taesd": taesd.build,
}
