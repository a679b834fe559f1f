"""Counting bad input: every skipped or repaired sample is recorded by kind, never silently dropped."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
        "upscaled_small_image",
    }
)


@dataclass(frozen=True)
class SkipEvent:
    """One bad or repaired file, as a DataLoader worker reports it to the main process (picklable)."""

    kind: str
    where: str
    detail: str = ""


class SkipLog:
    """Counts of skipped/repaired samples by kind, with a few example locations per kind for error messages."""

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.seen: set[tuple[str, str]] = set()  # (kind, where) of events, each counted once

    def add(self, kind: str, where: str, detail: str = "", n: int = 1, once: bool = False) -> None:
        """Count `n` samples of `kind`; with `once`, a file already counted under this kind is not counted again."""
        if once:
            if (kind, where) in self.seen:
                return
            self.seen.add((kind, where))
        self.counts[kind] += n
        examples = self.examples.setdefault(kind, [])
        if len(examples) < 3:
            examples.append(f"{where}: {detail}" if detail else where)
        level = logging.INFO if kind in REPAIRED_KINDS else logging.WARNING
        log.log(level if self.verbose else logging.DEBUG, "data: %s %s %s", kind, where, detail)

    def merge(self, report: Mapping[str, int] | Iterable[SkipEvent]) -> None:
        """Fold in what a worker sent: counts by kind (streams, where every occurrence counts) or events (files,
        met again every epoch and by several workers, so each (kind, file) counts once)."""
        if isinstance(report, Mapping):
            self.counts.update(report)
            return
        for e in report:
            self.add(e.kind, e.where, e.detail, once=True)

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
