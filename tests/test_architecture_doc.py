"""docs/architecture.md names every module under hyperlit/, and every path it names exists (the rule is stated in the
doc: a package's `__init__.py` is covered by its directory's row, every other module needs a row of its own)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_column_paths(text: str) -> list[str]:
    """The backticked paths in the first cell of each table row."""
    paths = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        paths.extend(re.findall(r"`([^`]+)`", first_cell))
    return paths


def unnamed_modules(named: set[str], package: Path) -> list[str]:
    """Modules under `package` that no row covers."""
    missing = []
    for module in sorted(package.rglob("*.py")):
        rel = module.relative_to(package.parent).as_posix()
        covered = rel in named or (module.name == "__init__.py" and rel[: -len("__init__.py")] in named)
        if not covered:
            missing.append(rel)
    return missing


def test_every_named_path_exists():
    named = first_column_paths((ROOT / "docs" / "architecture.md").read_text())
    assert len(named) > 40
    assert [p for p in named if not (ROOT / p).exists()] == []
    assert len(named) == len(set(named)), "a path has two rows"


def test_every_module_is_named():
    named = set(first_column_paths((ROOT / "docs" / "architecture.md").read_text()))
    assert unnamed_modules(named, ROOT / "hyperlit") == []


def test_the_check_sees_a_missing_row_and_a_directory_row_covers_only_init(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py"):
        (package / name).write_text("")
    named = {"pkg/", "pkg/a.py", "pkg/sub/"}
    assert unnamed_modules(named, package) == ["pkg/sub/b.py"]
    table = "| module | what |\n|---|---|\n| `pkg/a.py` | a |\n| `pkg/gone.py` | removed |\n"
    assert first_column_paths(table) == ["pkg/a.py", "pkg/gone.py"]
