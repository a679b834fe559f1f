"""Reading A1111's PNG ``parameters`` text back, for tests of what `hyperlit generate` writes."""

from __future__ import annotations

import re


def parse_parameters(text: str) -> tuple[str, str | None, dict[str, str]]:
    """Read an A1111 infotext back: prompt, negative prompt, key: value pairs (quoted values unquoted)."""
    lines = text.split("\n")
    negative = lines[1].removeprefix("Negative prompt: ") if lines[1].startswith("Negative prompt: ") else None
    pairs = dict(re.findall(r'\s*([\w ]+): ("(?:\\.|[^"])*"|[^,]*)(?:,|$)', lines[-1]))
    return lines[0], negative, {k.strip(): v.strip('"') for k, v in pairs.items()}
