"""Which keys a composed config may hold: a key added with ``+key=value`` that no part of hyperlit reads is refused.

Hydra refuses ``key=value`` for a key no config file defines, but accepts ``+key=value`` for any key, and nothing
would read it. A key of the composed config is read when
- a conf file defines it: the primary configs and every option of every group (whichever is selected: the same key
  of another option is read by the same code), placed at its package; the groups that only set values of other
  groups' keys (``recipe``, ``vae_model``, ``hparams_search``) define none;
- or it lies under a node with ``_target_`` and the target's signature takes it (a target with ``**kwargs``, or
  one that cannot be imported, takes everything: instantiate reports the latter);
- or it is a new entry with ``_target_`` of :data:`INSTANTIATED_ENTRIES` (``+callbacks.mine._target_=...``);
``hydra.*`` is Hydra's own structured config, which Hydra checks itself.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hyperlit.options import close_matches, not_allowed

# Groups whose every entry with `_target_` the runner instantiates (a new entry is a new logger or callback).
INSTANTIATED_ENTRIES = ("callbacks", "logger")
# Groups whose files set values of keys other groups define (package `_global_`), and Hydra's own group.
SETTING_GROUPS = ("recipe", "vae_model", "hparams_search", "hydra")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass(frozen=True)
class DefinedKeys:
    """Every dotted key path the conf files define: mappings, and leaves (values that are not mappings)."""

    paths: frozenset[str]
    leaves: frozenset[str]

    def allows(self, path: str) -> bool:
        """``path`` itself, or a leaf above it (e.g. a null the command line replaced by a mapping)."""
        parts = path.split(".")
        return path in self.paths or any(".".join(parts[:n]) in self.leaves for n in range(1, len(parts)))

    def close_matches(self, path: str) -> list[str]:
        """Defined keys beside ``path`` (same parent) that look like it."""
        parent, _, name = path.rpartition(".")
        siblings = {p.rpartition(".")[2]: p for p in self.paths if p.rpartition(".")[0] == parent}
        return [siblings[m] for m in close_matches(name, siblings)]


def _package_of(path: Path, conf_dir: Path) -> str:
    """Where a file's keys land: its ``# @package`` header, else its group (the folder path, dotted)."""
    group = ".".join(path.relative_to(conf_dir).parent.parts)
    for line in path.read_text().splitlines()[:3]:
        if line.startswith("# @package"):
            package = line.split(None, 2)[2].strip()
            return {"_global_": "", "_group_": group}.get(package, package)
    return group


def _paths(node: Any, prefix: str) -> Iterator[tuple[str, bool]]:
    """(dotted path, is a leaf) of every key in a plain nested mapping."""
    if not isinstance(node, Mapping):
        return
    for key, value in node.items():
        path = f"{prefix}{key}"
        yield path, not isinstance(value, Mapping)
        yield from _paths(value, path + ".")


def defined_keys(conf_dirs: Iterable[Path] = (CONF_DIR,)) -> DefinedKeys:
    """The keys every ``*.yaml`` under ``conf_dirs`` defines, at their packages (see the module docstring)."""
    paths: set[str] = set()
    leaves: set[str] = set()
    for conf_dir in conf_dirs:
        for file in sorted(Path(conf_dir).rglob("*.yaml")):
            if file.relative_to(conf_dir).parts[0] in SETTING_GROUPS:
                continue
            content = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
            if not isinstance(content, dict):
                continue
            content.pop("defaults", None)
            content.pop("hydra", None)
            package = _package_of(file, Path(conf_dir))
            if package:
                paths.update(".".join(package.split(".")[:n]) for n in range(1, package.count(".") + 2))
            for path, is_leaf in _paths(content, f"{package}." if package else ""):
                paths.add(path)
                if is_leaf:
                    leaves.add(path)
    return DefinedKeys(frozenset(paths), frozenset(leaves))


@dataclass(frozen=True)
class UnreadKey:
    """A key nothing reads, and the keys beside it that look like it."""

    path: str
    close: list[str]


def _locate(dotted: str) -> Any:
    """The object a ``_target_`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for name in parts[n:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _parameters(target: Any) -> list[str] | None:
    """The keyword arguments ``target`` takes; None when it takes any (``**kwargs``) or cannot be inspected."""
    try:
        signature = inspect.signature(_locate(str(target)))
    except Exception:  # not importable or not introspectable: instantiate reports or accepts it
        return None
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _unread_arguments(node: Mapping, prefix: str, defined: DefinedKeys) -> Iterator[UnreadKey]:
    """Keys of a ``_target_`` node that its target does not take (Hydra's own ``_x_`` keys aside)."""
    params = _parameters(node["_target_"])
    if params is None:
        return
    for key, value in node.items():
        path = f"{prefix}{key}"
        if str(key).startswith("_") and str(key).endswith("_"):
            continue
        if key not in params:
            yield UnreadKey(path, [f"{prefix}{m}" for m in close_matches(str(key), params)])
        elif isinstance(value, Mapping) and "_target_" in value:
            yield from _unread_arguments(value, path + ".", defined)


def _unread(node: Any, prefix: str, defined: DefinedKeys) -> Iterator[UnreadKey]:
    if not isinstance(node, Mapping):
        return
    if "_target_" in node:
        yield from _unread_arguments(node, prefix, defined)
        return
    for key, value in node.items():
        path = f"{prefix}{key}"
        new_entry = prefix.rstrip(".") in INSTANTIATED_ENTRIES and isinstance(value, Mapping) and "_target_" in value
        if not (defined.allows(path) or new_entry):
            yield UnreadKey(path, defined.close_matches(path))
        else:
            yield from _unread(value, path + ".", defined)


def check_keys_are_read(cfg: DictConfig, defined: DefinedKeys | None = None) -> None:
    """Refuse the first key of ``cfg`` that nothing reads (added with ``+key=``), naming it and any close match."""
    defined = defined or defined_keys()
    content = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(content, dict)
    content.pop("hydra", None)
    for unread in _unread(content, "", defined):
        value = OmegaConf.select(cfg, unread.path, throw_on_resolution_failure=False)
        hint = f"; did you mean {' or '.join(unread.close)}?" if unread.close else ""
        raise not_allowed(unread.path, value, f"no part of hyperlit reads this key{hint}")
