"""A1111's extra-network prompt syntax: ``<hypernet:NAME:MULT>`` and ``<lora:NAME:MULT>`` tags in a prompt.

A1111 matches ``<TYPE:ARGS>`` anywhere in the prompt, splits ARGS on ``:`` (the first is the name, the second the
multiplier, 1.0 when missing, negatives allowed) and removes every tag from the text the text encoder sees.
Tags of other types (``<lyco:...>``) are removed too and reported, as A1111 skips networks it does not know.
A1111's ``<lora:NAME:TE:UNET>`` (separate text-encoder and UNet multipliers) is refused by name: one multiplier
here scales the whole LoRA.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

# A tag is <type:args>; the type is a word and args run to the next '>' (A1111's extra-network pattern).
TAG = re.compile(r"<(\w+):([^>]+)>")
HYPERNET = "hypernet"
LORA = "lora"


@dataclass(frozen=True)
class HypernetTag:
    """One ``<hypernet:name:multiplier>`` tag, in prompt order."""

    name: str
    multiplier: float = 1.0


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:name:multiplier>`` tag, in prompt order."""

    name: str
    multiplier: float = 1.0


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt split into the text for the text encoder and the networks its tags ask for."""

    text: str
    hypernetworks: tuple[HypernetTag, ...]
    other_tags: tuple[str, ...] = ()  # tags of other extra-network types, removed and not applied
    loras: tuple[LoraTag, ...] = ()


def _multiplier(value: str, tag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"prompt tag {tag}: multiplier {value.strip()!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"prompt tag {tag}: multiplier {value.strip()!r} is not allowed; use a finite number")
    return number


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Remove the extra-network tags from ``prompt`` and return the hypernetwork and LoRA ones, each in order.

    Spaces around the name and the multiplier are ignored; the text keeps single spaces where tags were removed.
    """
    hypernetworks: list[HypernetTag] = []
    loras: list[LoraTag] = []
    others: list[str] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind not in (HYPERNET, LORA):
            others.append(match.group(0))
            return " "
        noun = "hypernetwork" if kind == HYPERNET else "LoRA"
        parts = [part.strip() for part in args.split(":")]
        if not parts[0]:
            raise ValueError(f"prompt tag {match.group(0)}: the {noun} name is empty")
        if len(parts) > 2:
            extra = " (separate text-encoder / UNet multipliers are not supported)" if kind == LORA else ""
            raise ValueError(f"prompt tag {match.group(0)}: expected <{kind}:NAME> or <{kind}:NAME:MULTIPLIER>{extra}")
        multiplier = _multiplier(parts[1], match.group(0)) if len(parts) == 2 else 1.0
        if kind == HYPERNET:
            hypernetworks.append(HypernetTag(parts[0], multiplier))
        else:
            loras.append(LoraTag(parts[0], multiplier))
        return " "

    text = TAG.sub(take, prompt)
    # Removing a tag leaves its surrounding spaces (and a stray ", ,"): collapse runs of blanks only, since the
    # CLIP tokenizer ignores them anyway and the rest of the text must reach the encoder unchanged.
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    return ParsedPrompt(text, tuple(hypernetworks), tuple(others), tuple(loras))


def tagged_folder(directory: Path | None, flag: str, first_tag: str, holding: str) -> Path:
    """The folder a prompt's tags are looked up in (`flag`'s value), checked: one line naming the flag when it is not
    set (`first_tag` is what asked for it) or not a folder. Shared by <hypernet:> and <lora:> tags."""
    if directory is None:
        raise ValueError(
            f"{flag} is not set, but the prompt asks for {first_tag}; set it to the folder holding {holding}"
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"{flag}: {directory} is not a folder")
    return directory
