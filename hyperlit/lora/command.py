"""`hyperlit to-lora HN OUT.safetensors`: a hypernetwork as a LoRA file, fitted on the base model's real inputs.

Every option, the hypernetwork file and the model config (no weights) are checked before the base model loads.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperlit import files
from hyperlit.files import HypernetworkFileError
from hyperlit.hypernetwork import Hypernetwork
from hyperlit.lora.export import FORMATS
from hyperlit.lora.fit import BAD_FIT, DEFAULT_ENERGY, FitSettings, LayerReport
from hyperlit.models import ModelSpec, SDComponents, validate_model_config
from hyperlit.models.hashing import file_sha256

log = logging.getLogger(__name__)

__all__ = ["ToLoraOptions", "ToLoraPlan", "ToLoraResult", "add_to_lora_parser", "plan", "to_lora"]

DTYPES = {"float16": torch.float16, "float32": torch.float32}
V_BIAS = ("auto", "on", "off")


@dataclass
class ToLoraOptions:
    """The `hyperlit to-lora` arguments; each check names the option, the value and what is allowed."""

    hypernetwork: Path
    out: Path
    model: str = "tiny"
    model_path: str | None = None
    tokenizer_path: str | None = None
    data: Path | None = None
    rank: int | None = None
    energy: float | None = None  # None with no rank: DEFAULT_ENERGY
    format: str = "kohya"
    v_bias: str = "auto"  # auto: on for diffusers (PEFT reads lora_B.bias), off for kohya (see README)
    dtype: str = "float16"

    def __post_init__(self) -> None:
        self.hypernetwork, self.out = Path(self.hypernetwork), Path(self.out)
        if self.out.suffix.lower() != ".safetensors":
            raise ValueError(f"OUT: {str(self.out)!r} is not allowed; LoRA files end in .safetensors")
        if self.rank is not None and self.energy is not None:
            raise ValueError(f"--rank {self.rank} and --energy {self.energy}: give one of them, not both")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"--rank: {self.rank!r} is not allowed; use an integer >= 1")
        if self.energy is not None and not (math.isfinite(self.energy) and 0 < self.energy <= 1):
            raise ValueError(f"--energy: {self.energy!r} is not allowed; use a number in (0, 1]")
        for key, value, allowed in (("--format", self.format, FORMATS), ("--v-bias", self.v_bias, V_BIAS),
                                    ("--dtype", self.dtype, tuple(DTYPES))):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
        if self.data is not None:
            self.data = Path(self.data)
            if not self.data.is_dir():
                raise FileNotFoundError(f"--data: {self.data} is not a folder (an A1111 folder of images + .txt)")
        if not self.hypernetwork.is_file():
            raise FileNotFoundError(f"HN_FILE: {self.hypernetwork} does not exist (a hypernetwork .pt/.safetensors)")

    @property
    def settings(self) -> FitSettings:
        v_bias = self.v_bias == "on" or (self.v_bias == "auto" and self.format == "diffusers")
        energy = None if self.rank is not None else (self.energy if self.energy is not None else DEFAULT_ENERGY)
        return FitSettings(rank=self.rank, energy=energy, v_bias=v_bias)


@dataclass(frozen=True)
class ToLoraPlan:
    """Everything checked before the model loads."""

    options: ToLoraOptions
    spec: ModelSpec
    hypernetwork: Hypernetwork
    settings: FitSettings


@dataclass(frozen=True)
class ToLoraResult:
    path: Path
    reports: list[LayerReport]
    size: int  # bytes of the LoRA file
    source_size: int  # bytes of the hypernetwork file


def _read_hypernetwork(path: Path) -> Hypernetwork:
    try:
        return files.load_hypernetwork(path)
    except HypernetworkFileError as err:
        raise ValueError(f"HN_FILE: {err}") from None


def plan(options: ToLoraOptions) -> ToLoraPlan:
    """Check the hypernetwork against the model family (widths, rank) without loading any model weights."""
    hn = _read_hypernetwork(options.hypernetwork)
    spec = validate_model_config(family=options.model, path=options.model_path, tokenizer_path=options.tokenizer_path)
    family = spec.family
    self_widths = [w for w in hn.sizes if w in family.attention_widths]
    cross = family.context_dim in hn.sizes
    if not self_widths and not cross:
        widths = sorted({*family.attention_widths, family.context_dim})
        raise ValueError(
            f"--model {family.name}: {options.hypernetwork} has modules for widths {hn.sizes}, but {family.name}'s "
            f"attention layers read widths {widths}; it was made for another model (set --model to its family)"
        )
    largest = max([*self_widths, min(family.context_dim, max(family.attention_widths)) if cross else 0])
    if options.rank is not None and options.rank > largest:
        raise ValueError(
            f"--rank: {options.rank} is larger than any layer's full rank on {family.name} for this network "
            f"({largest}); use at most {largest}, or --energy 1 for full rank everywhere"
        )
    return ToLoraPlan(options, spec, hn, options.settings)


def _metadata(the_plan: ToLoraPlan, components: SDComponents) -> dict[str, object]:
    options, hn = the_plan.options, the_plan.hypernetwork
    digest = file_sha256(options.hypernetwork)
    return {
        "hyperlit_source": options.hypernetwork.name,
        "hyperlit_source_sha256": digest,
        "hyperlit_source_hash": digest[:10],  # A1111's short hash of a file
        "hyperlit_source_step": hn.step,
        "hyperlit_base_model_family": the_plan.spec.family.name,
        "hyperlit_base_model_hash": components.checkpoint_hash or "",
        "hyperlit_base_model": components.checkpoint_name or "",
        "hyperlit_format": options.format,
        "hyperlit_v_bias": the_plan.settings.v_bias,
        "hyperlit_rank": options.rank if options.rank is not None else "energy",
        "hyperlit_energy": the_plan.settings.energy,
        "hyperlit_data": str(options.data) if options.data is not None else "",
    }


def run(the_plan: ToLoraPlan, components: SDComponents) -> ToLoraResult:
    """Fit and write the LoRA of a checked plan on loaded components."""
    from hyperlit.lora.convert import convert, key_style, write_conversion  # the fitting code needs diffusers
    from hyperlit.lora.inputs import read_data

    options = the_plan.options
    resolution = the_plan.spec.family.native_resolution(the_plan.spec.prediction_type)
    data = read_data(options.data, resolution)
    conversion = convert(the_plan.hypernetwork, components, data, the_plan.settings, resolution)
    style = key_style(options.format, components)
    write_conversion(options.out, conversion, style, DTYPES[options.dtype], _metadata(the_plan, components))
    return ToLoraResult(
        options.out,
        [fit.report for fit in conversion.fits],
        options.out.stat().st_size,
        options.hypernetwork.stat().st_size,
    )


def to_lora(options: ToLoraOptions) -> ToLoraResult:
    """Check everything, load the base model, fit and write."""
    the_plan = plan(options)
    from hyperlit.models import load_components

    components = load_components(family=options.model, path=options.model_path, tokenizer_path=options.tokenizer_path)
    components.to("cuda" if torch.cuda.is_available() else "cpu")
    return run(the_plan, components)


def format_report(result: ToLoraResult) -> str:
    """The per-layer table, the bad fits, and the file sizes."""
    lines = [
        f"{'layer':<58} {'kind':<5} {'width':>5} {'rank k/v':>9} {'energy k/v':>13} {'err k/v':>15} "
        f"{'effect err k/v':>15}"
    ]
    for r in result.reports:
        lines.append(
            f"{r.name:<58} {r.kind:<5} {r.width:>5} {f'{r.rank_k}/{r.rank_v}':>9} "
            f"{f'{r.energy_k:.4f}/{r.energy_v:.4f}':>13} {f'{r.error_k:.1e}/{r.error_v:.1e}':>15} "
            f"{f'{r.effect_error_k:.2f}/{r.effect_error_v:.2f}':>15}"
        )
    bad = [r for r in result.reports if r.fits_badly]
    if bad:
        lines.append(
            f"warning: {len(bad)} layer(s) fit badly (held-out error above {BAD_FIT:.0%} of the hypernetwork's "
            f"change): {', '.join(r.name for r in bad)}; a higher --rank / --energy or more --data may help"
        )
    lines.append(f"wrote {result.path} ({result.size:,} bytes; the hypernetwork file is {result.source_size:,} bytes)")
    return "\n".join(lines)


def _run_command(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    options = ToLoraOptions(
        hypernetwork=args.hypernetwork, out=args.out, model=args.model, model_path=args.model_path,
        tokenizer_path=args.tokenizer_path, data=args.data, rank=args.rank, energy=args.energy,
        format=args.format, v_bias=args.v_bias, dtype=args.dtype,
    )  # fmt: skip
    if options.data is None:
        print("note: no --data: self-attention inputs come from noise only; pass the training folder for a truer fit")
    print(format_report(to_lora(options)))
    return 0


def add_to_lora_parser(sub: argparse._SubParsersAction) -> None:
    """Register `to-lora` on the `hyperlit` console script."""
    p = sub.add_parser("to-lora", help="a hypernetwork as a LoRA (kohya or diffusers layout), fitted per layer")
    p.add_argument("hypernetwork", metavar="HN_FILE", help="any file `hyperlit inspect` reads (.pt / .safetensors)")
    p.add_argument("out", metavar="OUT", help="the LoRA file to write (.safetensors)")
    p.add_argument("--model", default="tiny", help="model family: tiny (embedded, the default), sd15, sd21, sdxl")
    p.add_argument("--model-path", default=None, help="checkpoint file or diffusers folder for sd15/sd21/sdxl")
    p.add_argument("--tokenizer-path", default=None, help="tokenizer folder for a single file (SDXL: both)")
    p.add_argument("--data", type=Path, default=None, help="the A1111 image folder (captions + latents to fit on)")
    ranks = p.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=int, default=None, help="rank of every to_k / to_v LoRA (capped at full)")
    ranks.add_argument(
        "--energy", type=float, default=None, help=f"least rank keeping this share of energy (default {DEFAULT_ENERGY})"
    )
    p.add_argument("--format", default="kohya", choices=FORMATS, help="key layout (kohya: A1111, Forge, ComfyUI...)")
    p.add_argument(
        "--v-bias", default="auto", choices=V_BIAS,
        help="keep V's constant as a to_out bias (auto: diffusers yes, kohya no: A1111 and diffusers refuse diff_b)",
    )  # fmt: skip
    p.add_argument("--dtype", default="float16", choices=tuple(DTYPES), help="dtype of the stored tensors")
    p.set_defaults(run=_run_command)
