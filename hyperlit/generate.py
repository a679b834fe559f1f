"""`hyperlit generate`: text-to-image with hypernetworks and LoRAs chosen by A1111 prompt tags, PNGs carrying A1111's
infotext.

Every option and every named hypernetwork and LoRA file is checked before the base model loads.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from hyperlit import files
from hyperlit.attention import hypernetworks_attached
from hyperlit.hypernetwork import Hypernetwork
from hyperlit.io import atomic_path
from hyperlit.lora.tagged import TaggedLora, check_tagged_loras, lora_hashes, loras_applied
from hyperlit.models import ModelSpec, SDComponents, load_components, validate_model_config
from hyperlit.prompt_tags import ParsedPrompt, parse_prompt, tagged_folder
from hyperlit.sampling import SampleSettings, check_sampler, check_size, make_pipeline, sample_image

log = logging.getLogger(__name__)


@dataclass
class GenerateOptions:
    """The `hyperlit generate` arguments; each check names the option, the value and what is allowed."""

    prompt: str
    out: Path
    hypernetwork_dir: Path | None = None
    lora_dir: Path | None = None
    model: str = "tiny"
    model_path: str | None = None
    tokenizer_path: str | None = None
    negative_prompt: str = ""
    seed: int = 0
    n: int = 4
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler_a"
    width: int | None = None  # None: the model's native size
    height: int | None = None

    def __post_init__(self) -> None:
        check_sampler(self.sampler, "--sampler")
        for key, value, least in (("--seed", self.seed, 0), ("--n", self.n, 1), ("--steps", self.steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{key}: {value!r} is not allowed; use an integer >= {least}")
        if not math.isfinite(self.cfg) or self.cfg < 0:
            raise ValueError(f"--cfg: {self.cfg!r} is not allowed; use a finite number >= 0")
        self.out = Path(self.out)
        if self.hypernetwork_dir is not None:
            self.hypernetwork_dir = Path(self.hypernetwork_dir)
        if self.lora_dir is not None:
            self.lora_dir = Path(self.lora_dir)


@dataclass(frozen=True)
class GenerationPlan:
    """Everything checked and resolved before the model loads."""

    options: GenerateOptions
    spec: ModelSpec
    parsed: ParsedPrompt
    hypernetworks: list[Hypernetwork] = field(default_factory=list)
    settings: SampleSettings = field(default_factory=SampleSettings)
    loras: list[TaggedLora] = field(default_factory=list)


def available_hypernetworks(directory: Path) -> dict[str, Path]:
    """Name (file stem, as A1111 keys its list) -> file, for the hypernetwork files in `directory`.

    A name with both a ``.pt`` and a ``.safetensors`` file means the ``.pt`` (A1111's own format).
    """
    found: dict[str, Path] = {}
    for extension in reversed(files.EXTENSIONS):  # later wins: .pt over .safetensors
        for path in sorted(directory.glob(f"*{extension}")):
            if path.is_file():
                found[path.stem] = path
    return dict(sorted(found.items()))


def _load_tagged(parsed: ParsedPrompt, directory: Path | None, spec: ModelSpec) -> list[Hypernetwork]:
    if not parsed.hypernetworks:
        return []
    first = f"<hypernet:{parsed.hypernetworks[0].name}>"
    directory = tagged_folder(directory, "--hypernetwork-dir", first, "the hypernetwork files")
    available = available_hypernetworks(directory)
    # Widths a network must have modules for to change anything on this model (self- and cross-attention).
    model_widths = {*spec.family.attention_widths, spec.family.context_dim}
    loaded = []
    for tag in parsed.hypernetworks:
        if tag.name not in available:
            names = ", ".join(available) or "none"
            raise ValueError(
                f"<hypernet:{tag.name}>: no {tag.name}.pt or {tag.name}.safetensors in {directory}; found: {names}"
            )
        hn = files.load_hypernetwork(available[tag.name])  # eval mode: inference multiplier, no dropout
        if not model_widths & set(hn.sizes):
            raise ValueError(
                f"<hypernet:{tag.name}>: {available[tag.name]} has modules for widths {hn.sizes}, but model "
                f"{spec.family.name} has attention widths {sorted(model_widths)}; it was made for another model"
            )
        hn.multiplier = tag.multiplier
        loaded.append(hn)
    return loaded


def plan(options: GenerateOptions) -> GenerationPlan:
    """Check the options, the model config (no weights) and the tagged files; load only the small networks (LoRA
    files are checked from their headers and loaded by diffusers at run time)."""
    parsed = parse_prompt(options.prompt)
    for tag in parsed.other_tags:
        log.warning("skipping %s: hyperlit applies only <hypernet:...> and <lora:...> tags", tag)
    spec = validate_model_config(family=options.model, path=options.model_path, tokenizer_path=options.tokenizer_path)
    native = spec.family.native_resolution(spec.prediction_type)
    multiple = spec.family.vae_scale_factor
    settings = SampleSettings(
        steps=options.steps,
        guidance_scale=options.cfg,
        sampler=options.sampler,
        height=check_size(options.height or native, "--height", multiple),
        width=check_size(options.width or native, "--width", multiple),
    )
    hypernetworks = _load_tagged(parsed, options.hypernetwork_dir, spec)
    loras = check_tagged_loras(parsed.loras, options.lora_dir, spec.family)
    return GenerationPlan(options, spec, parsed, hypernetworks, settings, loras)


def _quote(value: object) -> str:
    # A1111 quotes an infotext value as JSON when it holds a separator (',' ':' or a newline).
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def infotext(
    prompt: str,
    negative_prompt: str,
    settings: SampleSettings,
    seed: int,
    components: SDComponents,
    loras: list[TaggedLora] | None = None,
) -> str:
    """A1111's ``parameters`` text: the prompt (tags kept), ``Negative prompt: ...`` if any, then key: value pairs
    (``Lora hashes`` after the model, where A1111 puts its extra-network parameters)."""
    pairs = {
        "Steps": settings.steps,
        "Sampler": check_sampler(settings.sampler).a1111_name,
        "CFG scale": _number(settings.guidance_scale),
        "Seed": seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": components.checkpoint_hash,
        "Model": components.checkpoint_name,
        "Lora hashes": lora_hashes(loras or []),
    }
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def run(the_plan: GenerationPlan, components: SDComponents) -> list[Path]:
    """Render the images of a checked plan; image i uses seed + i (as A1111) and goes to OUT/<seed+i>-<i>.png."""
    options, settings = the_plan.options, the_plan.settings
    for hn in the_plan.hypernetworks:
        hn.to(components.unet.device)
    pipe = make_pipeline(components, settings.sampler)
    written = []
    # Attached even with no networks, so multiplier 0 and no tag run the very same attention code. LoRAs wrap
    # to_k / to_v (and whatever else they change) under the hypernetwork processors, which call those modules.
    with loras_applied(pipe, the_plan.loras), hypernetworks_attached(components.unet, the_plan.hypernetworks):
        for index in range(options.n):
            seed = options.seed + index
            image = sample_image(pipe, components, the_plan.parsed.text, options.negative_prompt, seed, settings)
            text = infotext(options.prompt, options.negative_prompt, settings, seed, components, the_plan.loras)
            written.append(save_png(image, options.out / f"{seed}-{index}.png", text))
    return written


def generate(options: GenerateOptions) -> list[Path]:
    """Check everything, load the base model, render and write the images."""
    the_plan = plan(options)
    components = load_components(family=options.model, path=options.model_path, tokenizer_path=options.tokenizer_path)
    components.to("cuda" if torch.cuda.is_available() else "cpu")
    return run(the_plan, components)
