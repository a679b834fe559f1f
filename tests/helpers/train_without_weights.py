"""`python tests/helpers/train_without_weights.py ARGS` is `python train.py ARGS` in which reading any weights fails
(exit 99 with a marker line): a configuration mistake must be reported before that."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_MARKER = "WEIGHTS WERE LOADED"


def refuse(*args, **kwargs):
    print(WEIGHTS_MARKER, file=sys.stderr)
    os._exit(99)


if __name__ == "__main__":
    from hyperlit import files, models
    from hyperlit.tasks.vae import build as vae_build

    models.load_components = refuse
    vae_build.load_vae = refuse
    vae_build.embedded_tiny_vae = refuse
    files.read_file = refuse
    sys.argv = [str(REPO_ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
