"""TEMPORARY: the VAE task's data moved to hyperlit.data.pixels / hyperlit.data.pixeldatamodule.

Kept only while hyperlit/tasks/vae.py (build_vae_task, run_vae) and tests/test_vae_task.py import these names;
delete it once the task builds its data with `instantiate(cfg.data)` and the runner reports `skipped`.
"""

from __future__ import annotations

import logging

from hyperlit.data.pixeldatamodule import PixelDataModule
from hyperlit.data.pixels import ImageCrops, scan_images

__all__ = ["ImageCrops", "VAEImageDataModule", "scan_images"]

log = logging.getLogger(__name__)


class VAEImageDataModule(PixelDataModule):
    """PixelDataModule plus the end-of-run report that today's run_vae does not print (the runner will)."""

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.skipped:
            log.warning("data: skipped or repaired samples by kind: %s", dict(self.skipped))
