"""Turn an exception from a run into the one-line ``<key or file>: <what is wrong>`` users see, or None for a bug.

Bad input is a ValueError/OSError raised by hyperlit's own checks, or anything a constructor that
``hydra.utils.instantiate`` called raised about its arguments (Lightning's Trainer, a DataModule, an optimizer):
Hydra's InstantiationException is unwrapped to its cause and its ``full_key`` names the config group.
"""

from __future__ import annotations

import re
from typing import Any

from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException

BAD_INPUT = (ValueError, OSError, MisconfigurationException)
# What a constructor raises about its arguments; counted as bad input only when raised inside instantiate.
BAD_ARGUMENTS = (*BAD_INPUT, TypeError)

# torch's UnpicklingError text ends with advice to re-run with weights_only=False, which would let a malicious
# checkpoint run code: any sentence or numbered point that mentions it is dropped, never passed on.
_UNSAFE_ADVICE = re.compile(r"[^.\n(]*weights_only[`'\"\s]*(?:set to |=\s*)?[`'\"]?False[^\n]*", re.IGNORECASE)
_FULL_KEY = re.compile(r"full_key:\s*(\S+)")


def strip_unsafe_advice(message: str) -> str:
    return _UNSAFE_ADVICE.sub("", message).strip()


def one_line(message: str) -> str:
    return "; ".join(part.strip(" -") for part in message.splitlines() if part.strip(" -"))


def _key_in_group(message: str, group: Any) -> str | None:
    """The group key the message mentions first (e.g. Lightning's "Precision '8-mixed' is invalid")."""
    if group is None or not hasattr(group, "keys"):
        return None
    found = [
        (m.start(), key)
        for key in group.keys()
        if not str(key).startswith("_") and (m := re.search(rf"\b{re.escape(str(key))}\b", message, re.IGNORECASE))
    ]
    return min(found)[1] if found else None


def bad_input_message(err: BaseException, cfg: Any = None) -> str | None:
    """The one-line message for bad input, or None when ``err`` is not bad input (a bug: let it raise)."""
    if isinstance(err, InstantiationException):
        found = _FULL_KEY.search(str(err))
        full_key = found[1] if found else None
        cause = err.__cause__
        if cause is None:  # e.g. a `_target_` that does not exist
            text = re.sub(r"\s*full_key:.*", "", str(err), flags=re.DOTALL)
            return one_line(f"{full_key}: {text}" if full_key else text)
        if not isinstance(cause, BAD_ARGUMENTS):
            return None
        text = bad_input_message(cause, cfg) or str(cause)
        if full_key and not text.startswith(full_key):
            group = _select(cfg, full_key)
            key = _key_in_group(text, group)
            text = f"{full_key}.{key}: {text}" if key else f"{full_key}: {text}"
        return text
    if not isinstance(err, BAD_INPUT):
        return None
    return one_line(strip_unsafe_advice(str(err))) or type(err).__name__


def _select(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)
