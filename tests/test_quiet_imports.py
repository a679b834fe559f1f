"""Loading hyperlit's models prints no advice to install torchvision (which would replace the torch build) or
accelerate (not a dependency)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_install_advice_and_the_filter_drops_nothing_else():
    code = (
        "import hyperlit\nfrom diffusers import StableDiffusionPipeline\nimport hyperlit.generate\n"
        "from hyperlit.demo.quality import load_pipeline\nfrom hyperlit.vae.load import load_vae\n"
        "from hyperlit.models.loader import TINY_BASE_DIR\n"
        "load_pipeline(); load_vae(TINY_BASE_DIR)\nprint('imported')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr
    assert "torchvision" not in done.stderr and "accelerate" not in done.stderr, done.stderr

    import hyperlit  # noqa: F401  (installs the filter in this process too)

    logger = logging.getLogger("transformers.utils.import_utils")

    def passes(message: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None)))

    assert not passes("`CLIPImageProcessor` requires torchvision (not installed); falling back to ...")
    assert passes("Could not import module 'Foo'. Are this object's requirements defined correctly?")
