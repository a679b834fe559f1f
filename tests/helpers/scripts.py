"""Import a repository script (train.py, datasets/*.py, benchmarks/*.py) as a module, for tests of its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Run the script at `path` as module `name` (default: its stem), registered in sys.modules.

    Registration matters: dataclasses defined in the script look their module up there.
    """
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
