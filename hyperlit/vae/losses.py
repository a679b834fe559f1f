"""Loss terms of decoder fine-tuning: reconstruction, adversarial (G and D), warm-up ramp.

Formulas follow LDM's ``LPIPSWithDiscriminator`` (from taming-transformers) with three fixes: the adaptive weight
computed in fp32, a D warm-up, and a ramp instead of the hard switch at ``disc_start``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

RECONSTRUCTION = ("l1", "mse")
GAN_LOSSES = ("hinge", "non_saturating")
RAMPS = ("linear", "cosine")


def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str) -> Tensor:
    """Mean per-element L1 or squared error.

    LDM sums over C·H·W and divides by B; with the KL term gone (frozen encoder) that only rescales every
    term by the same constant, and the adaptive GAN weight is a gradient-norm ratio, so the mean is equivalent.
    """
    diff = x_hat.float() - x.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "mse":
        return diff.square().mean()
    raise ValueError(f"loss.reconstruction={kind!r} is not supported; allowed: {', '.join(RECONSTRUCTION)}")


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str) -> Tensor:
    """D objective on real and (detached) fake logits, halved as in LDM so both kinds have the same scale."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"disc.loss={kind!r} is not supported; allowed: {', '.join(GAN_LOSSES)}")


def generator_loss(logits_fake: Tensor, kind: str) -> Tensor:
    """G objective: ``-mean D(x̂)`` for hinge (LDM), ``mean softplus(-D(x̂))`` for the non-saturating loss."""
    if kind == "hinge":
        return -logits_fake.float().mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake.float()).mean()
    raise ValueError(f"disc.loss={kind!r} is not supported; allowed: {', '.join(GAN_LOSSES)}")


def adversarial_factor(step: int, start: int, warmup_steps: int, ramp_steps: int, ramp: str = "linear") -> float:
    """Generator-side GAN factor in [0, 1].

    D trains from ``start``; G's adversarial term stays 0 for ``warmup_steps`` more steps (D warm-up, so G
    never meets a random D) and then ramps to 1 over ``ramp_steps`` (0 = switch on at once).
    """
    if ramp not in RAMPS:
        raise ValueError(f"disc.ramp={ramp!r} is not supported; allowed: {', '.join(RAMPS)}")
    begin = start + warmup_steps
    if step < begin:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    t = min(1.0, (step - begin + 1) / ramp_steps)
    return t if ramp == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))
