"""Counting bad input: every skipped or repaired sample is recorded by kind, never silently dropped."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

# Kinds that are repaired (the sample is still used) rather than skipped.
REPAIRED_KINDS = frozenset(
    {
        "converted_cmyk",
        "converted_16bit",
        "converted_palette",
        "converted_alpha",
        "converted_grayscale",
        "caption_not_utf8",
        "caption_empty",
    }
)


class SkipLog:
    """Counts of skipped/repaired samples by kind, with a few example locations per kind for error messages."""

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, where: str, detail: str = "", n: int = 1) -> None:
        self.counts[kind] += n
        examples = self.examples.setdefault(kind, [])
        if len(examples) < 3:
            examples.append(f"{where}: {detail}" if detail else where)
        level = logging.INFO if kind in REPAIRED_KINDS else logging.WARNING
        log.log(level if self.verbose else logging.DEBUG, "data: %s %s %s", kind, where, detail)

    def merge(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def summary(self) -> str:
        if not self.counts:
            return "no bad input"
        parts = []
        for kind, n in sorted(self.counts.items()):
            action = "repaired" if kind in REPAIRED_KINDS else "skipped"
            parts.append(f"{kind}={n} ({action})")
        return ", ".join(parts)

    def describe(self) -> str:
        """Multi-line reasons with examples, for the error raised when nothing usable is left."""
        lines = []
        for kind, n in sorted(self.counts.items()):
            lines.append(f"  {kind}: {n}  e.g. {'; '.join(self.examples.get(kind, []))}")
        return "\n".join(lines) if lines else "  (no files were found)"
