"""Held-out images for validation: chosen by content, excluded from training, the same on every rank.

A held-out image is scored in the UNet's latent space at its posterior mean (no latent sampling, so no run seed
enters) with the prompt the training rule fixes for it by content (``fixed_prompt_rng``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from torch import Tensor

from hyperlit.data.captions import make_prompt
from hyperlit.data.records import fixed_prompt_rng


@dataclass(frozen=True)
class HeldOut:
    """One held-out image, ready to score."""

    key: str  # content key (sha256 of the image bytes): seeds its validation noise
    latents: Tensor  # C×h×w in the UNet's latent space (scaled posterior mean), float32, CPU
    caption: str  # its [filewords] text (the default preview prompt)
    prompt: str  # the prompt training would use for it (template line fixed by content)


class HasSha(Protocol):
    sha: str


T = TypeVar("T", bound=HasSha)


def split_held_out(records: Sequence[T], count: int) -> tuple[list[T], list[T]]:
    """(training, held out): the `count` records with the smallest content keys, so the choice depends on the
    images only (not on file names, listing order or the run seed); a duplicate image stays on one side. The
    held-out list is in key order, so a score summed over it does not depend on listing order either."""
    if count <= 0:
        return list(records), []
    keys = sorted({r.sha for r in records})[:count]
    held = set(keys)
    chosen = {r.sha: r for r in records if r.sha in held}
    return [r for r in records if r.sha not in held], [chosen[key] for key in keys]


def held_out_prompt(template_lines: list[str], caption: str, name: str, sha: str) -> str:
    """The training prompt of an image with fixed captions (no tag shuffle or drop-out), whatever the config says."""
    return make_prompt(template_lines, caption, name, fixed_prompt_rng(sha), False, 0.0)
