"""fp16 safety check of a VAE decoder: decode in half precision and report each block's largest activation.

The SD-XL VAE is the known case: internal activations exceed fp16's range (65 504) and decode to NaN/black
images unless upcast (the reason sdxl-vae-fp16-fix exists). Fine-tuning can push a decoder over that edge too.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class BlockStat:
    name: str
    max_abs: float  # largest finite |activation| in the fp16 decode
    nonfinite: int  # inf/NaN elements in the block output

    @property
    def safe(self) -> bool:
        return self.nonfinite == 0


def decoder_blocks(vae: nn.Module) -> list[tuple[str, nn.Module]]:
    dec = vae.decoder
    blocks: list[tuple[str, nn.Module]] = []
    if getattr(vae, "post_quant_conv", None) is not None:
        blocks.append(("post_quant_conv", vae.post_quant_conv))
    blocks += [("decoder.conv_in", dec.conv_in), ("decoder.mid_block", dec.mid_block)]
    blocks += [(f"decoder.up_blocks.{i}", b) for i, b in enumerate(dec.up_blocks)]
    blocks += [("decoder.conv_norm_out", dec.conv_norm_out), ("decoder.conv_out", dec.conv_out)]
    return blocks


@torch.no_grad()
def fp16_decode_report(vae: nn.Module, latents: Tensor) -> list[BlockStat]:
    """Decode ``latents`` (raw, unscaled) with an fp16 copy of ``vae``; one BlockStat per decoder block."""
    return decode_report(vae, latents, torch.float16)


@torch.no_grad()
def decode_report(vae: nn.Module, latents: Tensor, dtype: torch.dtype) -> list[BlockStat]:
    """Decode ``latents`` with a ``dtype`` copy of ``vae``; one BlockStat per decoder block (fp32: the magnitudes
    an fp16 decode would have to hold)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # casting a copy on purpose: no "keep in float32" advice
    try:
        half = copy.deepcopy(vae).to(dtype=dtype).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    stats: dict[str, BlockStat] = {}
    hooks = []
    for name, module in decoder_blocks(half):

        def hook(_m: nn.Module, _inp: tuple, out: Tensor, name: str = name) -> None:
            out = out[0] if isinstance(out, tuple) else out
            finite = torch.isfinite(out)
            vals = out.float().abs()[finite]
            stats[name] = BlockStat(name, float(vals.max()) if vals.numel() else float("nan"), int((~finite).sum()))

        hooks.append(module.register_forward_hook(hook))
    try:
        half.decode(latents.to(device=next(half.parameters()).device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    return [stats[n] for n, _ in decoder_blocks(half) if n in stats]


@dataclass(frozen=True)
class Fp16Verdict:
    """Whether an fp16 decode stays finite and *well below* the fp16 range: every block's largest activation
    times ``headroom`` still fits under 65 504 (so inputs somewhat unlike the checked ones stay safe too)."""

    finite: bool
    peak: float  # largest |activation| over all blocks
    peak_block: str
    headroom: float

    @property
    def well_below(self) -> bool:
        return self.finite and self.peak * self.headroom <= FP16_MAX


HEADROOM = 8.0  # "well below": peak activation at most FP16_MAX / 8 (about 8 190)


def fp16_verdict(stats: list[BlockStat], headroom: float = HEADROOM) -> Fp16Verdict:
    def size(s: BlockStat) -> float:
        return 0.0 if math.isnan(s.max_abs) else s.max_abs  # NaN: a block whose every value overflowed

    worst = max(stats, key=lambda s: (not s.safe, size(s)))
    return Fp16Verdict(all(s.safe for s in stats), max(size(s) for s in stats), worst.name, headroom)


def format_report(stats: list[BlockStat]) -> str:
    lines = [f"  {s.name:<26} max|x| {s.max_abs:>12.4g}  inf/nan {s.nonfinite}" for s in stats]
    return "\n".join(lines)
