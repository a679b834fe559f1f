"""fp16-safe decoder fine-tuning, the method behind sdxl-vae-fp16-fix: keep the output of the original decoder
(a frozen fp32 teacher) while making the internal activations small, by scaling weights and biases down.

This is the second step of ``loss.kind=fp16_fix``: the first, :mod:`hyperlit.vae.fp16_rescale`, rescales exactly
every layer only a normalisation reads, and this one learns the rest. Every conv/linear layer of
``post_quant_conv`` + decoder gets two log-space gains (weight, bias); the task trains only those of the layers the
closed form left (and their readers). Adam steps on a log gain are relative (a few % per step), so activations can
shrink by orders of magnitude in a few hundred steps, which additive steps on the weights themselves cannot do at a
fine-tuning learning rate. The weights may train too (``train_weights``), but Adam's absolute steps swamp weights a
rescale made tiny. The gains are folded into the weights after every update, so the decoder is a plain
AutoencoderKL throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn

from hyperlit.vae.fp16 import FP16_MAX, HEADROOM


def decoder_layers(vae: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """post_quant_conv and every Conv2d/Linear of the decoder: where activation magnitudes are made."""
    if getattr(vae, "post_quant_conv", None) is not None:
        yield "post_quant_conv", vae.post_quant_conv
    for name, m in vae.decoder.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            yield f"decoder.{name}", m


@torch.no_grad()
def make_fp16_unsafe(vae: nn.Module, factor: float) -> None:
    """Multiply the decoder's residual stream by ``factor`` without changing its fp32 function (test fixture and
    demonstration of the SDXL-VAE failure).

    Every GroupNorm divides its input's scale away, so the stream can carry any scale up to the final
    ``conv_norm_out``: conv_in is scaled, each residual branch's last layer (resnet conv2, attention to_out) is
    scaled to match the scaled skip path, and layers fed by the scaled stream without a norm in between
    (shortcut convs, upsampler convs) only need their bias scaled. SiLU is not scale-invariant, which is why the
    scale is never put in front of one: every SiLU here follows a GroupNorm.
    """
    dec = vae.decoder
    for p in (dec.conv_in.weight, dec.conv_in.bias):
        p.mul_(factor)
    for m in dec.modules():
        if isinstance(m, ResnetBlock2D):
            m.conv2.weight.mul_(factor)
            m.conv2.bias.mul_(factor)
            if m.conv_shortcut is not None and m.conv_shortcut.bias is not None:
                m.conv_shortcut.bias.mul_(factor)
        elif isinstance(m, Attention):
            m.to_out[0].weight.mul_(factor)
            if m.to_out[0].bias is not None:
                m.to_out[0].bias.mul_(factor)
    for block in dec.up_blocks:
        for up in block.upsamplers or []:
            if up.conv.bias is not None:
                up.conv.bias.mul_(factor)


@torch.no_grad()
def scale_layer(vae: nn.Module, layer: str, factor: float, reader: str | None = None) -> None:
    """Multiply one layer's weight and bias by ``factor`` (test and benchmark fixture). Function-preserving in fp32
    when a GroupNorm alone reads the layer's output (a resnet's conv1); with ``reader``, the linear layer that reads
    it directly gets its weight divided by ``factor``, which keeps the function with no normalisation in between
    (post_quant_conv -> decoder.conv_in, an attention's to_v -> to_out.0)."""
    modules = dict(vae.named_modules())
    modules[layer].weight.mul_(factor)
    if modules[layer].bias is not None:
        modules[layer].bias.mul_(factor)
    if reader is not None:
        modules[reader].weight.div_(factor)


class LayerGains(nn.Module):
    """Two log gains (weight, bias) per decoder layer, applied to the layer's output while ``applied()`` is active:
    ``out -> exp(g_w)·(out - b) + exp(g_b)·b``, i.e. the layer with weight ``exp(g_w)·W`` and bias ``exp(g_b)·b``.
    ``fold()`` multiplies them into the weights and resets them to 0, so between steps the VAE holds plain weights
    (EMA, exports, checkpoints and the fp16 check need nothing special) and each optimizer step on a gain is a
    relative rescaling of its layer."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self._layers = list(decoder_layers(vae))  # a plain list: the layers stay registered in the VAE only
        self.log_gains = nn.ParameterDict(
            {name.replace(".", "__"): nn.Parameter(torch.zeros(2)) for name, _ in self._layers}
        )

    def _hook(self, gain: Tensor):
        def scaled(layer: nn.Module, _inp: tuple, out: Tensor) -> Tensor:
            if layer.bias is None:
                return out * gain[0].exp()
            shape = (1, -1) + (1,) * (out.ndim - 2) if isinstance(layer, nn.Conv2d) else (-1,)
            b = layer.bias.view(shape)
            return gain[0].exp() * (out - b) + gain[1].exp() * b

        return scaled

    @contextmanager
    def applied(self) -> Iterator[None]:
        handles = [
            # prepend: the gain applies before any other hook (the activation monitor) sees the output
            layer.register_forward_hook(self._hook(self.log_gains[name.replace(".", "__")]), prepend=True)
            for name, layer in self._layers
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def fold(self) -> None:
        for name, layer in self._layers:
            gain = self.log_gains[name.replace(".", "__")]
            layer.weight.mul_(gain[0].exp())
            if layer.bias is not None:
                layer.bias.mul_(gain[1].exp())
            gain.zero_()


class ActivationMonitor:
    """Forward hooks recording each decoder layer's, resnet's and attention's largest |output| per sample."""

    def __init__(self, vae: nn.Module) -> None:
        self.peaks: dict[str, Tensor] = {}
        modules = dict(decoder_layers(vae))
        modules.update(
            (f"decoder.{n}", m) for n, m in vae.decoder.named_modules() if isinstance(m, (ResnetBlock2D, Attention))
        )
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def record(_m: nn.Module, _inp: tuple, out) -> None:
            out = out[0] if isinstance(out, tuple) else out
            self.peaks[name] = out.abs().flatten(1).amax(dim=1)

        return record

    def clear(self) -> None:
        self.peaks.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def activation_penalty(peaks: dict[str, Tensor], target: float) -> Tensor:
    """Mean over monitored modules of mean over samples of relu(log(peak / target))²: zero once every peak is below
    ``target`` (then it stops pulling and leaves the output to the teacher term); in log space so a peak 100×
    too large does not drown the teacher term, and a step on a log gain moves it at a steady rate."""
    total = torch.zeros((), device=next(iter(peaks.values())).device)
    for p in peaks.values():
        total = total + F.relu(torch.log(p.float().clamp_min(1e-12) / target)).pow(2).mean()
    return total / len(peaks)


@dataclass(frozen=True)
class Fp16FixLoss:
    """teacher reproduction (MSE to the fp32 teacher's output, relative to its variance) + penalty weight ×
    activation penalty. The default target leaves a factor 2 below the "well below" verdict (FP16_MAX/HEADROOM)."""

    penalty_weight: float = 1.0
    target: float = FP16_MAX / HEADROOM / 2

    def __call__(self, student: Tensor, teacher: Tensor, peaks: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        rec = F.mse_loss(student.float(), teacher.float()) / teacher.float().var().clamp_min(1e-8)
        pen = activation_penalty(peaks, self.target)
        return rec + self.penalty_weight * pen, {"teacher_mse": rec.detach(), "activation_penalty": pen.detach()}
