"""Turn an exception from a run into the one-line ``<key or file>: <what is wrong>`` users see, or None for a bug.

Bad input is a ValueError/OSError raised by hyperlit's own checks, or anything a constructor that
``hydra.utils.instantiate`` called raised about its arguments (Lightning's Trainer, a DataModule, an optimizer):
Hydra's InstantiationException is unwrapped to its cause and its ``full_key`` names the config group.
"""

from __future__ import annotations

import re
from typing import Any

from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException

from hyperlit.options import close_matches

BAD_INPUT = (ValueError, OSError, MisconfigurationException)
# What a constructor raises about its arguments; counted as bad input only when raised inside instantiate.
BAD_ARGUMENTS = (*BAD_INPUT, TypeError)

# torch's UnpicklingError text ends with advice to re-run with weights_only=False, which would let a malicious
# checkpoint run code: any sentence or numbered point that mentions it is dropped, never passed on.
_UNSAFE_ADVICE = re.compile(r"[^.\n(]*weights_only[`'\"\s]*(?:set to |=\s*)?[`'\"]?False[^\n]*", re.IGNORECASE)
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_FULL_KEY = re.compile(r"full_key:\s*(\S+)")
# PyTorch re-raises a DataLoader worker's exception as a new one of the same type whose text is this header and
# the worker's whole formatted traceback (torch.utils._utils.ExceptionWrapper.reraise).
_WORKER_HEADER = re.compile(r"Caught (\w+) [^\n]*\.\nOriginal Traceback \(most recent call last\):\n")


def strip_unsafe_advice(message: str) -> str:
    """``message`` without any advice to load with weights_only=False; torch's whole refusal text is replaced."""
    start = message.find("Weights only load failed")
    if start >= 0:
        found = _UNSAFE_GLOBAL.search(message)
        what = f"it holds pickled objects beyond tensors ({found[1]})" if found else "it is not a plain tensor file"
        head = message[:start].rstrip(" (:")
        return (
            f"{head + ': ' if head else ''}{what}, which a safe (weights-only) load refuses; "
            "allowed: tensors only (convert the file to .safetensors with a tool you trust)"
        )
    return _UNSAFE_ADVICE.sub("", message).strip()


def _worker_message(message: str) -> str:
    """The worker exception's own message from the text PyTorch re-raises it with; any other message unchanged."""
    header = _WORKER_HEADER.match(message)
    if header is None:
        return message
    # The raised exception is the last traceback (earlier ones are its chained causes); its frame and source lines
    # are indented, and its message starts at the first line that is not, after the (module-qualified) type name.
    lines = message.rsplit("Traceback (most recent call last):\n", 1)[1].splitlines()
    start = next((i for i, line in enumerate(lines) if line[:1].strip()), None)
    if start is None:
        return message
    first = re.sub(rf"^(?:[\w.]+\.)?{header[1]}(?::\s|$)", "", lines[start], count=1)
    return "\n".join([first, *lines[start + 1 :]]).strip() or message


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


def _without_full_key(message: str) -> str:
    return re.sub(r"\s*full_key:.*", "", message, flags=re.DOTALL)


def bad_input_message(err: BaseException, cfg: Any = None) -> str | None:
    """The one-line message for bad input, or None when ``err`` is not bad input (a bug: let it raise)."""
    if isinstance(err, InstantiationException):
        found = _FULL_KEY.search(str(err))
        full_key = found[1] if found else None
        cause = err.__cause__
        if cause is None or isinstance(cause, ImportError):  # e.g. a `_target_` Hydra cannot locate
            key = f"{full_key}._target_" if full_key else "_target_"
            return one_line(f"{key}: {_without_full_key(str(err))}")
        if not isinstance(cause, BAD_ARGUMENTS):
            return None
        text = bad_input_message(cause, cfg) or one_line(str(cause))
        if full_key and not text.startswith(full_key):
            key = _key_in_group(text, _select(cfg, full_key))
            text = f"{full_key}.{key}: {text}" if key else f"{full_key}: {text}"
        return text
    if not isinstance(err, BAD_INPUT):
        return None
    return one_line(strip_unsafe_advice(_worker_message(str(err)))) or type(err).__name__


def _select(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_APPEND_ADVICE = re.compile(r"\s*To append to your config use \+(\S+)")
_ALREADY_SET = re.compile(r"An item is already at '([^']+)'")
_REMOVE_PLUS = re.compile(r"Either remove \+ prefix: '([^']+)'")


def _overrides(text: str) -> list[str]:
    """The override Hydra's append refusal quotes, with its + restored."""
    found = _REMOVE_PLUS.search(text)
    return [f"+{found[1]}"] if found else []


def _did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    close = close_matches(word, choices)
    return f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""


def hydra_message(err: HydraException) -> str:
    """One line for a mistake Hydra finds while composing the config (before any hyperlit code runs).

    Never suggests ``+key=``: a key that no config file defines is not read by hyperlit either.
    """
    text = str(err)
    if isinstance(err, OverrideParseException):
        return f"{err.override}: {one_line(err.message)}"
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = sorted(err.options)
        hint = _did_you_mean(option, options)
        return f"{group.replace('/', '.')}={option}: no such option; {hint}allowed: {', '.join(options)}"
    appending = _ALREADY_SET.search(text)
    if appending:
        line = next((o for o in _overrides(text) if o.startswith("+")), f"+{appending[1]}")
        return f"{line}: {appending[1]} is already set; drop the + to change it ({line.lstrip('+')})"
    overridden = _COULD_NOT_OVERRIDE.search(text)
    if isinstance(err, ConfigCompositionException) and overridden:
        key = overridden[1]
        appended = _APPEND_ADVICE.search(text)
        shown = appended[1] if appended else key
        cause = err.__cause__
        parent = getattr(cause, "parent_node", None)
        if parent is not None and hasattr(parent, "keys") and "not in struct" in str(cause):
            prefix = key.rpartition(".")[0]
            keys = sorted(str(k) for k in parent.keys() if not str(k).startswith("_"))
            name = key.rpartition(".")[2]
            hint = _did_you_mean(name, keys, f"{prefix}." if prefix else "")
            where = f"keys of {prefix}" if prefix else "top-level keys"
            return f"{shown}: no such key; {hint}{where}: {', '.join(keys)}"
        reason = _APPEND_ADVICE.sub("", text.split("\n", 1)[1] if "\n" in text else "")
        reason = one_line(f"{reason}\n{_without_full_key(str(cause)) if cause is not None else ''}")
        return f"{shown}: {reason or 'cannot be overridden'}"
    text = re.sub(r"\s*Config search path:.*", "", text, flags=re.DOTALL)
    return one_line(_APPEND_ADVICE.sub("", text))
