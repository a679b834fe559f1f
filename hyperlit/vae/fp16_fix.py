"""fp16-safe decoder fine-tuning, the method behind sdxl-vae-fp16-fix: keep the output of the original decoder
(a frozen fp32 teacher) while making the internal activations small, by scaling weights and biases down.

The scaling is learned directly: every conv/linear layer of ``post_quant_conv`` + decoder gets two log-space
gains (weight, bias). Adam steps on a log gain are relative (a few % per step), so activations can shrink by
orders of magnitude in a few hundred steps, which additive steps on the weights themselves cannot do at a
fine-tuning learning rate. The weights may train too (small lr) to absorb what pure rescaling cannot express.
``fold_gains`` multiplies the gains into the weights, so the exported decoder is a plain AutoencoderKL.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn
from torch.nn.utils import parametrize

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


class LogGain(nn.Module):
    """Parametrization ``w -> exp(g) · w`` with a learnable scalar ``g`` (0 at start: the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(()))

    def forward(self, w: Tensor) -> Tensor:
        return w * self.log_gain.exp()


def add_gains(vae: nn.Module) -> list[nn.Parameter]:
    """Attach a weight gain and a bias gain to each decoder layer; returns the gain parameters."""
    gains = []
    for _, layer in decoder_layers(vae):
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                gain = LogGain().to(layer.weight.device)
                parametrize.register_parametrization(layer, name, gain)
                gains.append(gain.log_gain)
    return gains


@torch.no_grad()
def fold_gains(vae: nn.Module) -> None:
    """Multiply the gains into the weights and remove the parametrizations (plain state-dict keys again)."""
    for _, layer in decoder_layers(vae):
        for name in ("weight", "bias"):
            if parametrize.is_parametrized(layer, name):
                parametrize.remove_parametrizations(layer, name, leave_parametrized=True)


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
