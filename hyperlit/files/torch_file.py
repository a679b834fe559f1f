"""The one reader for ``.pt`` / ``.ckpt`` / ``.pth`` files from outside: ``torch.load(weights_only=True)``.

A pickle can run any code when it is loaded; the weights-only unpickler refuses everything except tensors and plain
containers, so a malicious file is refused before anything in it runs. torch's own error text for such a file
advises loading it again without that protection; these errors never pass that advice on.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

# torch words a refused global "Unsupported global: GLOBAL builtins.exec was not an allowed global ..." or, for
# blocked modules, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
_BLOCKED_GLOBAL = re.compile(r"unsupported global:?\s*(?:GLOBAL )?([\w.]+)", flags=re.IGNORECASE)


class TorchFileError(ValueError):
    """A torch file that cannot be read safely; the message names the file and what is wrong with it."""


def load_torch_file(path: str | Path, label: str | None = None) -> object:
    """The object stored in ``path``, read on CPU by the weights-only unpickler.

    ``label`` is how errors name the file (e.g. ``model.path=/m/v1-5.ckpt``); the path by default.
    """
    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise TorchFileError(f"{label}: no such file")
    if path.stat().st_size == 0:
        raise TorchFileError(f"{label}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = _BLOCKED_GLOBAL.search(str(err))
        if blocked:
            raise TorchFileError(
                f"{label} holds pickled objects beyond tensors ({blocked.group(1)}): code or objects that "
                "weights_only loading does not allow; the file was refused, nothing in it ran"
            ) from None
        raise TorchFileError(
            f"{label} is not a readable torch file (truncated, corrupt or another format); nothing in it ran"
        ) from None
    except Exception as err:  # torch raises many types for truncated or foreign files
        detail = " ".join(str(err).split())[:200]
        # Never pass on torch's advice to retry without the weights-only protection.
        detail = "" if "weights_only" in detail else f": {type(err).__name__}: {detail}"
        raise TorchFileError(
            f"{label} is not a readable torch file (truncated, corrupt or another format){detail}"
        ) from None
