"""The exact part of fp16_fix: rescale, in closed form, every decoder layer whose output only a normalisation reads.

GroupNorm divides its input's scale away, so multiplying a layer's weight and bias by ``s`` changes nothing
downstream when every reader of that layer's output is a GroupNorm. Two kinds of such groups in a diffusers
AutoencoderKL decoder:

- ``norm``: a ResnetBlock2D's ``conv1``, read only by ``norm2`` (no time embedding is added in a VAE decoder).
- ``stream``: a segment of the residual stream. Its values are summed by ``conv_in``, every ``conv2`` and every
  attention ``to_out`` (the producers, scaled by ``s``), and carried by identity skips; they are read by ``norm1``,
  the attentions' ``group_norm`` and ``conv_norm_out``, and by two kinds of linear layers that start the next
  segment: a resnet's ``conv_shortcut`` and an upsampler's conv (nearest resize, then a conv). Those get weight
  ``x s / s_prev`` and bias ``x s``, so each segment keeps its own scale. A segment's conv2 alone is not followed
  by a norm (it feeds the residual sum), which is why a stream is scaled as a whole or not at all.

Every ``s`` is a power of two, so the multiplication itself is exact in floating point; what changes in fp32 is
only GroupNorm's ``eps`` relative to the rescaled variance, and that change is measured and reported. Layers that
stay over the target (``post_quant_conv``, attention ``to_q/to_k/to_v``, ``conv_out``, or any part of a decoder
whose structure is not the one above) are left to fine-tuning, which :func:`fine_tune_scope` narrows to them and to
the layers that read their output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import Tensor, nn

from hyperlit.vae.fp16_fix import decoder_layers


@dataclass
class ScaleGroup:
    """Layers rescaled together by one power-of-two factor with no change downstream (see the module docstring)."""

    name: str
    kind: str  # "norm" (feeds a GroupNorm directly) | "stream" (a residual-stream segment read only by norms)
    scaled: list[str] = field(default_factory=list)  # weight and bias x s
    entries: list[str] = field(default_factory=list)  # weight x s / s_previous, bias x s
    previous: int | None = None  # index of the segment the entries read
    watched: list[tuple[str, float]] = field(default_factory=list)  # outputs that scale with s, x the factor fp16 holds
    exact: bool = True  # false when a block in the segment is not of the known shape: left to fine-tuning


@dataclass(frozen=True)
class LayerChange:
    """One rescaled layer: its group, the factors applied to weight and bias, and the group's peak before / after."""

    layer: str
    group: str
    kind: str
    weight_factor: float
    bias_factor: float
    peak_before: float
    peak_after: float

    def line(self) -> str:
        factors = (
            f"x 2^{math.log2(self.weight_factor):+.0f}"
            if self.weight_factor == self.bias_factor
            else f"weight x 2^{math.log2(self.weight_factor):+.0f}, bias x 2^{math.log2(self.bias_factor):+.0f}"
        )
        via = "feeds a GroupNorm" if self.kind == "norm" else f"residual {self.group}, read only by norms"
        return f"{self.layer}: {factors} ({via}); peak {self.peak_before:.4g} -> {self.peak_after:.4g}"


@dataclass(frozen=True)
class LayerPeak:
    """A layer whose output peak is over the target with no exact rescale available: fine-tuning's job."""

    layer: str
    peak: float

    def line(self) -> str:
        return f"{self.layer}: peak {self.peak:.4g}, no normalisation alone reads it: left to fine-tuning"


@dataclass(frozen=True)
class RescaleReport:
    """What the closed form changed, what it left, and how much the fp32 output moved (GroupNorm's eps)."""

    changes: list[LayerChange]
    left: list[LayerPeak]
    fp32_change: float  # max |output after - output before| in fp32 over the measured latents
    output_range: float  # max |output before|, for scale
    peak_before: float
    peak_after: float
    target: float
    images: int

    def lines(self) -> list[str]:
        return [c.line() for c in self.changes] + [p.line() for p in self.left] + [self.summary()]

    def summary(self) -> str:
        layers = len(self.changes)
        groups = len({c.group for c in self.changes})
        return (
            f"fp16 closed-form rescale on {self.images} training images: {layers} layers in {groups} groups rescaled "
            f"(target peak {self.target:.0f}); peak {self.peak_before:.4g} -> {self.peak_after:.4g}; fp32 output "
            f"change max {self.fp32_change:.2e} (output range {self.output_range:.3g}); "
            + (f"{len(self.left)} layers left to fine-tuning" if self.left else "nothing left to fine-tuning")
        )


def _resnet_is_plain(resnet: ResnetBlock2D) -> bool:
    """A VAE decoder resnet: GroupNorms, no time embedding, no resampling inside."""
    return (
        isinstance(resnet.norm1, nn.GroupNorm)
        and isinstance(resnet.norm2, nn.GroupNorm)
        and getattr(resnet, "time_emb_proj", None) is None
        and not getattr(resnet, "up", False)
        and not getattr(resnet, "down", False)
        and isinstance(resnet.conv1, nn.Conv2d)
        and isinstance(resnet.conv2, nn.Conv2d)
    )


def _attention_is_plain(attn: Attention) -> bool:
    """Self-attention that group-norms its input and adds it back: its input is read only by that norm."""
    return (
        isinstance(getattr(attn, "group_norm", None), nn.GroupNorm)
        and getattr(attn, "spatial_norm", None) is None
        and bool(getattr(attn, "residual_connection", False))
        and isinstance(attn.to_out[0], nn.Linear)
    )


def scale_groups(vae: nn.Module) -> list[ScaleGroup]:
    """The norm-read groups of a diffusers AutoencoderKL decoder, in forward order; [] for other decoders."""
    dec = getattr(vae, "decoder", None)
    if dec is None or not all(hasattr(dec, a) for a in ("conv_in", "up_blocks", "conv_norm_out")):
        return []
    names = {id(m): f"decoder.{n}" for n, m in dec.named_modules()}
    norm_groups: list[ScaleGroup] = []
    segments = [ScaleGroup(f"stream from {names[id(dec.conv_in)]}", "stream", scaled=[names[id(dec.conv_in)]])]
    segments[0].watched.append((names[id(dec.conv_in)], 1.0))

    def resnet(block: ResnetBlock2D) -> None:
        current = segments[-1]
        if not _resnet_is_plain(block):
            current.exact = False
            return
        conv1 = names[id(block.conv1)]
        norm_groups.append(ScaleGroup(conv1, "norm", scaled=[conv1], watched=[(conv1, 1.0)]))
        if block.conv_shortcut is not None:
            shortcut = names[id(block.conv_shortcut)]
            current = ScaleGroup(f"stream from {shortcut}", "stream", entries=[shortcut], previous=len(segments) - 1)
            segments.append(current)
            current.watched.append((shortcut, 1.0))
        conv2 = names[id(block.conv2)]
        current.scaled.append(conv2)
        # the sum (skip + conv2) is formed before the division by output_scale_factor
        current.watched += [(conv2, 1.0), (names[id(block)], float(block.output_scale_factor))]

    def attention(block: Attention) -> None:
        current = segments[-1]
        if not _attention_is_plain(block):
            current.exact = False
            return
        to_out = names[id(block.to_out[0])]
        current.scaled.append(to_out)
        current.watched += [(to_out, 1.0), (names[id(block)], float(block.rescale_output_factor))]

    def upsampler(block: nn.Module) -> None:
        conv = getattr(block, "conv", None)
        if not isinstance(block, Upsample2D) or getattr(block, "norm", None) is not None:
            segments[-1].exact = False
            return
        if conv is None:  # a bare resize carries the stream unchanged
            return
        entry = names[id(conv)]
        segments.append(ScaleGroup(f"stream from {entry}", "stream", entries=[entry], previous=len(segments) - 1))
        segments[-1].watched.append((entry, 1.0))

    mid = getattr(dec, "mid_block", None)
    if mid is not None:
        resnet(mid.resnets[0])
        for attn, block in zip(mid.attentions, mid.resnets[1:], strict=True):
            if attn is not None:
                attention(attn)
            resnet(block)
    for up in dec.up_blocks:
        for block in up.resnets:
            resnet(block)
        for block in up.upsamplers or []:
            upsampler(block)
    if not isinstance(dec.conv_norm_out, nn.GroupNorm):
        segments[-1].exact = False
    for segment in segments:  # `previous` indexes the returned list, where the segments follow the norm groups
        if segment.previous is not None:
            segment.previous += len(norm_groups)
    return norm_groups + segments


class _PeakRecorder:
    """Forward hooks keeping each named module's largest |output| (x a factor) over every call, in fp32."""

    def __init__(self, modules: dict[str, nn.Module], factors: dict[str, float]) -> None:
        self.peaks: dict[str, float] = {}
        self._handles = [m.register_forward_hook(self._hook(n, factors.get(n, 1.0))) for n, m in modules.items()]

    def _hook(self, name: str, factor: float):
        def record(_m: nn.Module, _inp: tuple, out) -> None:
            out = out[0] if isinstance(out, tuple) else out
            peak = float(out.detach().float().abs().amax()) * factor
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak)

        return record

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _monitored(vae: nn.Module) -> dict[str, nn.Module]:
    """Every conv/linear of post_quant_conv + decoder, and every resnet and attention (their sums)."""
    modules = dict(decoder_layers(vae))
    modules.update(
        (f"decoder.{n}", m) for n, m in vae.decoder.named_modules() if isinstance(m, ResnetBlock2D | Attention)
    )
    return modules


@torch.no_grad()
def _decode_all(
    vae: nn.Module, latents: Sequence[Tensor], factors: dict[str, float]
) -> tuple[dict[str, float], list[Tensor]]:
    recorder = _PeakRecorder(_monitored(vae), factors)
    try:
        outputs = []
        for z in latents:
            with torch.autocast(device_type=z.device.type, enabled=False):
                outputs.append(vae.decode(z.float()).sample.float())
    finally:
        recorder.remove()
    return recorder.peaks, outputs


def _power_of_two_scale(peak: float, target: float) -> float:
    """The largest power of two s <= 1 with peak x s <= target (1 when already under)."""
    if not math.isfinite(peak):
        raise ValueError(f"an fp32 activation peak is {peak}: the decoder overflows even in fp32")
    if peak <= target:
        return 1.0
    return 2.0 ** math.floor(math.log2(target / peak))


def _group_factors(groups: Sequence[ScaleGroup]) -> dict[str, float]:
    return {name: factor for g in groups for name, factor in g.watched}


def rescale_decoder(
    vae: nn.Module,
    latents: Sequence[Tensor],
    target: float,
    reduce_max: Callable[[Tensor], Tensor] | None = None,
) -> RescaleReport:
    """Measure fp32 activation peaks while decoding ``latents`` (raw, unscaled), rescale every exact group so its
    peak is at most ``target``, and report what changed and what is left. ``reduce_max`` (element-wise max over
    DDP ranks) makes every rank apply the same factors."""
    groups = scale_groups(vae)
    factors = _group_factors(groups)
    modules = dict(vae.named_modules())
    peaks, before = _decode_all(vae, latents, factors)
    peaks = _reduce(peaks, reduce_max)
    scales = []
    for g in groups:
        peak = max((peaks.get(n, 0.0) for n, _ in g.watched), default=0.0)
        scales.append(_power_of_two_scale(peak, target) if g.exact else 1.0)
    changes_at: list[tuple[str, ScaleGroup, float, float, float]] = []
    with torch.no_grad():
        for g, s in zip(groups, scales, strict=True):
            prev = scales[g.previous] if g.previous is not None else 1.0
            for name in g.scaled:
                if s != 1.0:
                    _scale(modules[name], s, s)
                    changes_at.append((name, g, s, s, _group_peak(g, peaks)))
            for name in g.entries:
                if s != 1.0 or prev != 1.0:
                    _scale(modules[name], s / prev, s)
                    changes_at.append((name, g, s / prev, s, _group_peak(g, peaks)))
    after_peaks, after = _decode_all(vae, latents, factors)
    after_peaks = _reduce(after_peaks, reduce_max)
    changes = [
        LayerChange(name, g.name, g.kind, wf, bf, peak, _group_peak(g, after_peaks))
        for name, g, wf, bf, peak in changes_at
    ]
    layer_names = {name for name, _ in decoder_layers(vae)}
    left = [LayerPeak(n, p) for n, p in after_peaks.items() if n in layer_names and p > target]
    fp32_change = max((float((a - b).abs().max()) for a, b in zip(after, before, strict=True)), default=0.0)
    output_range = max((float(b.abs().max()) for b in before), default=0.0)
    if reduce_max is not None:
        fp32_change, output_range = (float(v) for v in reduce_max(torch.tensor([fp32_change, output_range])))
    return RescaleReport(
        changes=changes,
        left=left,
        fp32_change=fp32_change,
        output_range=output_range,
        peak_before=max(peaks.values(), default=0.0),
        peak_after=max(after_peaks.values(), default=0.0),
        target=target,
        images=sum(int(z.shape[0]) for z in latents),
    )


def _group_peak(group: ScaleGroup, peaks: dict[str, float]) -> float:
    return max((peaks.get(n, 0.0) for n, _ in group.watched), default=0.0)


def _scale(layer: nn.Module, weight_factor: float, bias_factor: float) -> None:
    layer.weight.mul_(weight_factor)
    if layer.bias is not None:
        layer.bias.mul_(bias_factor)


def _reduce(peaks: dict[str, float], reduce_max: Callable[[Tensor], Tensor] | None) -> dict[str, float]:
    if reduce_max is None or not peaks:
        return peaks
    keys = sorted(peaks)
    values = reduce_max(torch.tensor([peaks[k] for k in keys], dtype=torch.float64))
    return {k: float(v) for k, v in zip(keys, values, strict=True)}


def readers(vae: nn.Module) -> dict[str, list[str]]:
    """For layers no norm alone reads: the layers that read their output and can take a compensating scale."""
    out: dict[str, list[str]] = {}
    if getattr(vae, "post_quant_conv", None) is not None:
        out["post_quant_conv"] = ["decoder.conv_in"]
    for n, m in vae.decoder.named_modules():
        if isinstance(m, Attention):
            q, k, v, o = (f"decoder.{n}.{x}" for x in ("to_q", "to_k", "to_v", "to_out.0"))
            out |= {q: [k], k: [q], v: [o]}
    return out


def fine_tune_scope(vae: nn.Module, left: Iterable[str]) -> list[str] | None:
    """The layers fine-tuning may change: the ones left over the target and the layers that read them (so the
    teacher loss can compensate a shrinking gain); None (everything) when a left layer's readers are unknown."""
    table = readers(vae)
    scope: list[str] = []
    for name in left:
        if name not in table:
            return None
        for n in (name, *table[name]):
            if n not in scope:
                scope.append(n)
    return scope
