"""Where the repository's files are, for tests that read them or run its entry points."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
SAMPLE_DIR = REPO_ROOT / "datasets" / "sample"
