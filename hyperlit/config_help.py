"""``python train.py --help``: the config groups with their options and the main keys, each with the one-line
comment its conf file gives it (read from the files, so the help never drifts from them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# `key: value  # comment` (the comment optional); a `#` inside a value needs a space before it to start a comment.
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[\w.-]+):(?: +(?P<value>[^#\s].*?))?(?: +# ?(?P<comment>.*))?$")
_DEFAULTS_LINE = re.compile(r"^ *- (?:optional )?(?P<group>[\w/]+): *(?P<option>[^#]*?) *(?:# ?(?P<comment>.*))?$")
# Groups a user does not choose from the command line (Hydra's own, the run-dir layout, settings for one pairing).
HIDDEN_GROUPS = ("hydra", "paths", "recipe", "vae_model")
# The groups whose default option's keys are listed with the primary config's own keys.
KEY_GROUPS = {"train": ("hypernet", "model", "data"), "vae": ("loss",)}


@dataclass(frozen=True)
class Key:
    """One key of a conf file: dotted path, value as written, the comment on its line."""

    path: str
    value: str
    comment: str


@dataclass(frozen=True)
class Group:
    """A config group: its options, the default, the comment on its defaults-list line."""

    name: str
    options: list[str]
    default: str
    comment: str


def file_keys(path: Path, prefix: str = "") -> list[Key]:
    """Every key of a YAML conf file with its line's comment, in file order (lists and ``defaults`` skipped)."""
    keys: list[Key] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings above the current line
    for line in path.read_text().splitlines():
        found = _KEY_LINE.match(line)
        if not found:
            continue
        indent = len(found["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = found["key"]
        dotted = ".".join([*(k for _, k in stack), name])
        stack.append((indent, name))
        if dotted.split(".")[0] in ("defaults", "hydra") or name.startswith("_"):
            continue
        keys.append(Key(prefix + dotted, (found["value"] or "").strip(), (found["comment"] or "").strip()))
    return keys


def _package(path: Path, group: str) -> str:
    first = path.read_text().splitlines()[:1]
    if first and first[0].startswith("# @package"):
        package = first[0].split(None, 2)[2].strip()
        return "" if package == "_global_" else package
    return group


def config_groups(conf_dir: Path, config_name: str) -> list[Group]:
    """The groups in ``config_name``'s defaults list that a user picks, with every option found in conf/."""
    groups = []
    for line in (conf_dir / f"{config_name}.yaml").read_text().splitlines():
        found = _DEFAULTS_LINE.match(line)
        if not found or found["group"] in HIDDEN_GROUPS or "$" in found["option"]:
            continue
        name = found["group"]
        options = sorted(p.stem for p in (conf_dir / name).glob("*.yaml"))
        groups.append(Group(name, options, found["option"], (found["comment"] or "").strip()))
    return groups


def main_keys(conf_dir: Path, config_name: str) -> list[Key]:
    """The primary config's own keys, then those of the default option of its :data:`KEY_GROUPS`."""
    keys = [_shown(k) for k in file_keys(conf_dir / f"{config_name}.yaml") if k.value or k.comment]
    defaults = {g.name: g for g in config_groups(conf_dir, config_name)}
    for name in KEY_GROUPS.get(config_name, ()):
        group = defaults.get(name) or next((g for g in defaults.values() if _lands_in(conf_dir, g, name)), None)
        if group is None:
            continue
        option_file = conf_dir / group.name / f"{group.default}.yaml"
        keys += [
            _shown(k) for k in file_keys(option_file, _package(option_file, group.name) + ".") if k.value or k.comment
        ]
    return keys


def _shown(key: Key) -> Key:
    """A mapping (no value of its own) is shown as ``path.*``."""
    return key if key.value else Key(f"{key.path}.*", "", key.comment)


def _lands_in(conf_dir: Path, group: Group, package: str) -> bool:
    return _package(conf_dir / group.name / f"{group.default}.yaml", group.name) == package


def _column(rows: list[tuple[str, str]], indent: int = 2) -> list[str]:
    width = min(max((len(a) for a, _ in rows), default=0), 38)
    return [f"{' ' * indent}{a:<{width}}  {b}".rstrip() for a, b in rows]


def help_text(conf_dir: Path, config_name: str = "train") -> str:
    """The whole ``--help`` text for ``conf/<config_name>.yaml``."""
    primary = conf_dir / f"{config_name}.yaml"
    title = next((line.lstrip("# ") for line in primary.read_text().splitlines() if line.startswith("#")), "")
    lines = [
        f"usage: python train.py{'' if config_name == 'train' else f' --config-name {config_name}'} "
        "[GROUP=OPTION ...] [KEY=VALUE ...]",
        "",
        title,
        "Other configs: --config-name train (hypernetworks, the default) | --config-name vae (the VAE decoder).",
        "",
        "Groups (GROUP=OPTION; * marks the default):",
    ]
    lines += _column(
        [
            (
                g.name,
                ", ".join(f"{o}*" if o == g.default else o for o in g.options)
                + (f"  ({g.comment})" if g.comment else ""),
            )
            for g in config_groups(conf_dir, config_name)
        ]
    )
    lines += ["", "Main keys (KEY=VALUE; the default as written in conf/):"]
    lines += _column(
        [(f"{k.path}={k.value}" if k.value else k.path, k.comment) for k in main_keys(conf_dir, config_name)]
    )
    lines += [
        "",
        "Every key of the composed config can be set the same way; `python train.py --cfg job` prints them all.",
        "Multirun: python train.py -m hypernet=swish_121,relu_121. Hydra's own flags: --hydra-help.",
        "A mistake (an unknown option or key, a bad value) stops the run with one line before any model loads.",
    ]
    return "\n".join(lines) + "\n"
