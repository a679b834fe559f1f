"""Hypernetwork training on a frozen Stable Diffusion UNet."""

from hyperlit.tasks.hypernetwork.build import build
from hyperlit.tasks.hypernetwork.module import HypernetworkTask

__all__ = ["HypernetworkTask", "build"]
