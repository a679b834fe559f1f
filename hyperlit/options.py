"""One strict way to turn a config mapping into a validated (nested) dataclass, and one error grammar.

Every option group that is validated before weights load (``hypernet`` -> HypernetworkConfig, the VAE task's
``loss``/``disc``/``posterior``/...) goes through :func:`build_options`, so an unknown or bad key always reads
``<key>: <value> is not allowed; <what is allowed>``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")


def not_allowed(key: str, value: Any, allowed: str) -> ValueError:
    """The one error grammar for bad values: ``<key>: <value> is not allowed; <what is allowed>``."""
    return ValueError(f"{key}: {value!r} is not allowed; {allowed}")


def close_matches(word: str, choices: Iterable[str]) -> list[str]:
    """The (at most two) choices that look like ``word``: for "did you mean" hints."""
    return difflib.get_close_matches(word, sorted(set(choices)), n=2, cutoff=0.75)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise not_allowed(key, value, "allowed: " + ", ".join(str(c) for c in choices))


def check_min(key: str, value: float, minimum: float, strict: bool = False) -> None:
    if value < minimum or (strict and value == minimum):
        raise not_allowed(key, value, f"use a number {'>' if strict else '>='} {minimum}")


def build_options(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "", ignore: Iterable[str] = ()) -> T:
    """Build ``cls`` from a plain mapping; nested dataclass fields recurse with a dotted ``prefix``.

    An unknown key is an error naming it and listing the allowed keys; a ``ValueError`` or ``TypeError`` raised
    by the dataclass itself is re-raised with the group prefix when it does not already name a key.
    """
    ignored = set(ignore)  # keys of the group that other code reads (allowed, but not fields of cls)
    data = {k: v for k, v in dict(data or {}).items() if k not in ignored}
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        allowed = ", ".join(sorted({*names, *ignored}))
        raise ValueError(f"{prefix}{unknown[0]}: {unknown[0]!r} is not allowed; allowed keys: {allowed}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if is_dataclass(hint) and isinstance(value, Mapping):
            value = build_options(hint, value, f"{prefix}{name}.")  # type: ignore[arg-type]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a list where a number belongs
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err
