"""Score several VAEs on the same images: PSNR, SSIM, LPIPS, rFID and colour checks, side by side.

Protocol (the Stability model cards'): each image is decoded safely, its short side resized to the resolution
(bicubic) and centre-cropped to a square; it is encoded with the posterior mode (no sampling noise, so runs
repeat exactly), decoded in fp32, and the reconstruction is clamped and rounded to 8 bits before every metric.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from hyperlit.data.images import IMAGE_EXTENSIONS, BadImage, decode_image, place, to_pixels
from hyperlit.data.skips import SkipLog
from hyperlit.io import atomic_path
from hyperlit.vae.colour import ColourAccumulator, ColourCheck, ColourLimits, compare_colours
from hyperlit.vae.lpips import LPIPS
from hyperlit.vae.metrics import RFID, lpips_per_image, psnr_per_image, ssim_per_image, to_uint8
from hyperlit.vae.taesd_eval import TinyReconstruction

PSNR_TOLERANCE = 0.1  # dB a model may fall below the reference before --fail-if-worse fails
LPIPS_TOLERANCE = 0.005  # LPIPS a model may rise above the reference


@dataclass
class EvalImages:
    names: list[str]
    pixels: Tensor  # N×3×R×R uint8: what every model encodes
    resolution: int
    skips: SkipLog
    reference: Tensor | None = None  # N×3×R×R uint8: --reference-model's reconstructions; None: the inputs
    reference_source: str | None = None

    @property
    def targets(self) -> Tensor:
        """What every metric compares a reconstruction with: the reference model's reconstruction, or the input."""
        return self.pixels if self.reference is None else self.reference

    def protocol(self) -> str:
        against = (
            "the inputs"
            if self.reference is None
            else f"{self.reference_source}'s own reconstruction of each input (posterior mode, 8 bits)"
        )
        return (
            f"{len(self.names)} images; short side resized to {self.resolution} px (bicubic), centre crop "
            f"{self.resolution}x{self.resolution}; posterior mode; fp32 decode; outputs rounded to 8 bits; "
            f"PSNR/SSIM on [0, 1]; metrics against {against}; bad input: {self.skips.summary()}"
        )


def load_eval_images(folder: str | os.PathLike, resolution: int, limit: int | None = None) -> EvalImages:
    """The images under ``folder`` (recursive, sorted), prepared by the protocol; bad files skipped and counted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data={str(folder)!r}: not a folder of images")
    if resolution < 8 or resolution % 8:
        raise ValueError(f"--resolution: {resolution} is not allowed; a multiple of 8, at least 8")
    skips = SkipLog(verbose=False)
    names: list[str] = []
    pixels: list[Tensor] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        if limit is not None and len(names) >= limit:
            break
        try:
            decoded = decode_image(path.read_bytes())
        except BadImage as e:
            skips.add(e.kind, str(path), e.detail)
            continue
        for repair in decoded.repairs:
            skips.add(repair, str(path))
        rgb = decoded.rgb
        pixels.append(to_uint8(to_pixels(rgb, place(rgb.size, (resolution, resolution), "crop"))))
        names.append(str(path.relative_to(root)))
    if not names:
        raise ValueError(f"--data={str(folder)!r}: no usable images ({IMAGE_EXTENSIONS})\n{skips.describe()}")
    return EvalImages(names, torch.stack(pixels), resolution, skips)


def with_reference(images: EvalImages, vae: nn.Module, source: str, batch_size: int = 8) -> EvalImages:
    """``images`` scored against ``vae``'s reconstruction of each (``--reference-model``) instead of the inputs: how
    closely a model copies that VAE (a tiny decoder against the decoder it was distilled from)."""
    vae = vae.eval()
    batches = [reconstruct(vae, images.pixels[i : i + batch_size]) for i in range(0, len(images.names), batch_size)]
    return dataclasses.replace(images, reference=torch.cat(batches), reference_source=source)


@dataclass
class ModelScore:
    label: str
    source: str
    psnr: float
    ssim: float
    lpips: float | None
    rfid: float | None
    colour: ColourCheck
    per_image_psnr: list[float] = field(repr=False)
    seconds: float = 0.0
    # --fp16: PSNR of this model's fp16 decode against the first model's fp32 decode (nan: the fp16 decode overflowed)
    fp16_psnr: float | None = None

    def worst(self, k: int) -> list[int]:
        return sorted(range(len(self.per_image_psnr)), key=lambda i: self.per_image_psnr[i])[:k]

    def to_dict(self, names: list[str]) -> dict:
        return {
            "label": self.label,
            "source": self.source,
            "psnr": self.psnr,
            "ssim": self.ssim,
            "lpips": self.lpips,
            "rfid": self.rfid,
            "colour": self.colour.to_dict(),
            "warnings": self.colour.warnings,
            "worst": [names[i] for i in self.worst(3)],
            "seconds": self.seconds,
            "fp16_psnr": self.fp16_psnr,
        }


@torch.no_grad()
def reconstruct(vae: nn.Module, images: Tensor) -> Tensor:
    """uint8 in, uint8 out: encode to the posterior mode, decode in fp32 (a tiny autoencoder: its own latents)."""
    dtype = next(vae.parameters()).dtype
    x = images.float().div(127.5).sub(1.0).to(dtype)
    if isinstance(vae, TinyReconstruction):
        return to_uint8(vae(x))
    z = vae.encode(x).latent_dist.mode()
    return to_uint8(vae.decode(z).sample)


def _finite_mean(values: Tensor) -> float:
    # identical images have infinite PSNR; the mean is then taken over the finite values (all-inf -> inf)
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.inf


def score_model(
    label: str,
    source: str,
    vae: nn.Module,
    images: EvalImages,
    *,
    batch_size: int = 8,
    lpips: LPIPS | None = None,
    rfid: RFID | None = None,
    limits: ColourLimits | None = None,
    colour_inputs: ColourAccumulator | None = None,
) -> ModelScore:
    """One model over every image against ``images.targets``. ``rfid`` must already hold the targets' features."""
    vae = vae.eval()
    psnrs, ssims, lps = [], [], []
    inputs = colour_inputs or ColourAccumulator()
    outputs = ColourAccumulator()
    if rfid is not None:
        rfid.start_model()
    start = time.perf_counter()
    for i in range(0, len(images.names), batch_size):
        x = images.targets[i : i + batch_size]
        y = reconstruct(vae, images.pixels[i : i + batch_size])
        psnrs.append(psnr_per_image(x, y))
        ssims.append(ssim_per_image(x, y))
        if lpips is not None:
            lps.append(lpips_per_image(lpips, x, y))
        if rfid is not None:
            rfid.add_fake(y)
        if colour_inputs is None:
            inputs.update(x)
        outputs.update(y)
    per_psnr = torch.cat(psnrs)
    return ModelScore(
        label=label,
        source=source,
        psnr=_finite_mean(per_psnr),
        ssim=float(torch.cat(ssims).mean()),
        lpips=float(torch.cat(lps).mean()) if lps else None,
        rfid=rfid.compute() if rfid is not None else None,
        colour=compare_colours(inputs.result(), outputs.result(), limits),
        per_image_psnr=[float(v) for v in per_psnr],
        seconds=time.perf_counter() - start,
    )


def evaluate(
    models: list[tuple[str, str, nn.Module]],
    images: EvalImages,
    *,
    batch_size: int = 8,
    lpips: LPIPS | None = None,
    rfid: RFID | None = None,
    limits: ColourLimits | None = None,
) -> list[ModelScore]:
    """Every (label, source, vae) on the same images, in order, against ``images.targets``."""
    inputs = ColourAccumulator()
    for i in range(0, len(images.names), batch_size):
        x = images.targets[i : i + batch_size]
        inputs.update(x)
        if rfid is not None:
            rfid.add_real(x)
    if rfid is not None and len(images.names) < 2:
        raise ValueError("--inception-weights: rFID needs at least 2 images")
    return [
        score_model(
            label,
            source,
            vae,
            images,
            batch_size=batch_size,
            lpips=lpips,
            rfid=rfid,
            limits=limits,
            colour_inputs=inputs,
        )
        for label, source, vae in models
    ]


@torch.no_grad()
def fp16_fidelity(models: list[tuple[str, str, nn.Module]], images: EvalImages, batch_size: int = 8) -> list[float]:
    """Per model: PSNR (dB, on [0, 1], mean over images) of its fp16 decode against the *first* model's fp32 decode
    of the same latents (the first model's posterior modes): how well an fp16-fixed decoder keeps the original's
    output, as fp16_fix is measured. nan when the fp16 decode holds inf/NaN (the symptom: black images)."""
    first = models[0][2].eval()
    dtype = next(first.parameters()).dtype
    halves = [half_copy(vae) for _, _, vae in models]
    per_model: list[list[Tensor]] = [[] for _ in models]
    for i in range(0, len(images.names), batch_size):
        x = images.pixels[i : i + batch_size].float().div(127.5).sub(1.0).to(dtype)
        z = first.encode(x).latent_dist.mode()
        reference = first.decode(z).sample.float().clamp(-1, 1).cpu()
        for scores, half in zip(per_model, halves, strict=True):
            device = next(half.parameters()).device
            out = half.decode(z.to(device=device, dtype=torch.float16)).sample.float().cpu()
            finite = torch.isfinite(out).flatten(1).all(1)
            mse = ((out.clamp(-1, 1) - reference) / 2).pow(2).flatten(1).mean(1)
            scores.append(torch.where(finite, -10 * torch.log10(mse), torch.nan))
    return [math.nan if torch.cat(v).isnan().any() else _finite_mean(torch.cat(v)) for v in per_model]


def half_copy(vae: nn.Module) -> nn.Module:
    """An fp16 copy of ``vae`` (diffusers' advice to keep it in fp32 silenced: the cast is the point)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return copy.deepcopy(vae).to(torch.float16).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(scores: list[ModelScore]) -> str:
    """One row per model; colour columns are reconstruction / input ratios and the largest channel-mean shift."""
    head = ["model", "PSNR", "SSIM", "LPIPS", "rFID", "sat", "contrast", "shift", "s/img"]
    fp16 = any(s.fp16_psnr is not None for s in scores)
    if fp16:
        head.append("fp16 PSNR")
    rows = [head]
    for s in scores:
        n = max(len(s.per_image_psnr), 1)
        shift = max(s.colour.mean_shift, key=abs)
        rows.append(
            [
                s.label,
                _fmt(s.psnr, ".2f"),
                _fmt(s.ssim, ".4f"),
                _fmt(s.lpips, ".4f"),
                _fmt(s.rfid, ".2f"),
                f"x{s.colour.saturation_ratio:.2f}",
                f"x{s.colour.contrast_ratio:.2f}",
                f"{shift:+.3f}",
                f"{s.seconds / n:.3f}",
            ]
            + ([_fmt(s.fp16_psnr, ".2f")] if fp16 else [])
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def worse_than(
    scores: list[ModelScore],
    reference: str,
    psnr_tolerance: float = PSNR_TOLERANCE,
    lpips_tolerance: float = LPIPS_TOLERANCE,
) -> list[str]:
    """One line per model that is worse than ``reference`` beyond the tolerances (PSNR lower, LPIPS higher)."""
    by_label = {s.label: s for s in scores}
    if reference not in by_label:
        raise ValueError(f"--fail-if-worse: {reference!r} is not one of the evaluated models ({', '.join(by_label)})")
    ref = by_label[reference]
    failures = []
    for s in scores:
        if s is ref:
            continue
        if s.psnr < ref.psnr - psnr_tolerance:
            failures.append(f"{s.label}: PSNR {s.psnr:.2f} < {reference}'s {ref.psnr:.2f} - {psnr_tolerance}")
        if s.lpips is not None and ref.lpips is not None and s.lpips > ref.lpips + lpips_tolerance:
            failures.append(f"{s.label}: LPIPS {s.lpips:.4f} > {reference}'s {ref.lpips:.4f} + {lpips_tolerance}")
    return failures


@torch.no_grad()
def worst_panel(
    models: list[tuple[str, str, nn.Module]], scores: list[ModelScore], images: EvalImages, k: int = 4
) -> tuple[np.ndarray, list[int]]:
    """H×W×3 uint8: one row per image among each model's ``k`` worst (by PSNR), columns input | (reference |)
    model 1 | ... ."""
    rows: list[int] = []
    for s in scores:
        rows += [i for i in s.worst(k) if i not in rows]
    x = images.pixels[rows]
    columns = [x] + ([images.reference[rows]] if images.reference is not None else [])
    columns += [reconstruct(vae, x) for _, _, vae in models]
    grid = torch.cat([torch.cat(list(col), dim=1) for col in columns], dim=2)  # 3×(n·R)×(m·R)
    return grid.permute(1, 2, 0).numpy(), rows


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)
