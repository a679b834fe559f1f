"""Generate from a diffusers folder (the tiny base by default) and score the images with the shapes judge.

Shared by tests/test_tiny_base.py and benchmarks/learning_proof.py: fixed prompts x fixed seeds in, the share of
images with the asked colour and shape (adherence) and the share in the checkered style out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from PIL import Image

from hyperlit.attention import hypernetworks_attached
from hyperlit.files import load_hypernetwork
from hyperlit.lora.tagged import TaggedLora, loras_applied
from hyperlit.models.loader import TINY_BASE_DIR
from hyperlit.pretrained import OFFLINE

from .shapes import caption, judge

SAMPLERS = {
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
}


@dataclass(frozen=True)
class Target:
    """What a prompt asks for."""

    colour: str
    shape: str
    background: str = "white"

    @property
    def prompt(self) -> str:
        return caption(self.colour, self.shape, self.background)


@dataclass(frozen=True)
class Score:
    samples: int
    adherence: float  # share of images with the asked colour and shape
    colour: float  # share with the asked colour
    shape: float  # share with the asked shape
    style: float  # share judged to be in the checkered style


def load_pipeline(folder: str | Path = TINY_BASE_DIR, sampler: str = "dpmpp_2m") -> StableDiffusionPipeline:
    """A text-to-image pipeline from a diffusers folder, offline, with the named sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not allowed; allowed: {', '.join(SAMPLERS)}")
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, **OFFLINE
    )
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    cfg: float = 5.0,
    batch: int = 32,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in the order given; each image's noise comes from its own seed."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch]]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=generators, output_type="pil")
        images += out.images
    return images


def generate_at_multipliers(
    hypernetwork: str | Path,
    targets: Sequence[Target],
    seeds: Sequence[int],
    multipliers: Sequence[float],
    steps: int = 20,
    cfg: float = 5.0,
    base: str | Path | None = None,
    sampler: str = "dpmpp_2m",
) -> dict[float, list[Image.Image]]:
    """One image per (target, seed) at each multiplier of the hypernetwork file, applied to the base
    (default: the embedded tiny base); every multiplier sees the same prompts and noise."""
    pipe = load_pipeline(base or TINY_BASE_DIR, sampler)
    hn = load_hypernetwork(hypernetwork)
    hn.eval()
    out = {}
    with hypernetworks_attached(pipe.unet, [hn]):
        for m in multipliers:
            hn.multiplier = m
            out[m] = generate(pipe, [t.prompt for t in targets], seeds, steps=steps, cfg=cfg)
    return out


def generate_with_lora(
    lora: Path,
    targets: Sequence[Target],
    seeds: Sequence[int],
    strength: float = 1.0,
    steps: int = 20,
    cfg: float = 5.0,
    base: str | Path | None = None,
    sampler: str = "dpmpp_2m",
) -> list[Image.Image]:
    """One image per (target, seed) with a LoRA file at `strength` on the base, loaded by diffusers'
    `load_lora_weights`; the same prompts and noise as `generate_at_multipliers` gives its hypernetwork."""
    pipe = load_pipeline(base or TINY_BASE_DIR, sampler)
    with loras_applied(pipe, [TaggedLora(Path(lora).stem, Path(lora), strength, short_hash="")]):
        return generate(pipe, [t.prompt for t in targets], seeds, steps=steps, cfg=cfg)


def score(images: Sequence[Image.Image], targets: Sequence[Target]) -> Score:
    """Judge each image against its target; shares over all images."""
    if len(images) != len(targets) or not images:
        raise ValueError(f"need one target per image and at least one image (got {len(images)}, {len(targets)})")
    verdicts = [judge(im) for im in images]
    n = len(images)
    return Score(
        samples=n,
        adherence=sum(v.matches(t.colour, t.shape) for v, t in zip(verdicts, targets, strict=True)) / n,
        colour=sum(v.colour == t.colour for v, t in zip(verdicts, targets, strict=True)) / n,
        shape=sum(v.shape == t.shape for v, t in zip(verdicts, targets, strict=True)) / n,
        style=sum(v.checker for v in verdicts) / n,
    )


def grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images (all one size) in rows of `columns`, for looking at a run."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet
