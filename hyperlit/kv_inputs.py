"""The K and V inputs that hypernetworks make from an attention layer's context, and their per-forward sharing.

Every cross-attention layer of an SD UNet receives the very same text-context tensor, so the K/V inputs the
hypernetworks make from it are the same in every layer. :func:`share_context_kv` computes them once per UNet
forward; each layer reuses them only if :meth:`SharedContextKV.serves` confirms they were made from this exact
tensor by these networks in their current state, else the layer computes its own (always correct, only slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["SharedContextKV", "SupportsForwardKV", "apply_hypernetworks", "share_context_kv", "shareable"]

# Modules whose output is random in training mode: each layer must draw its own mask (A1111 applies the network
# in every layer separately), so a network holding one of these in training mode is never shared.
STOCHASTIC_IN_TRAINING = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)


@runtime_checkable
class SupportsForwardKV(Protocol):
    """What the processor needs from a hypernetwork (hyperlit.hypernetwork.Hypernetwork satisfies it)."""

    multiplier: float

    def forward_kv(self, context: Tensor) -> tuple[Tensor, Tensor]: ...


def _param_dtype(hypernetwork: object) -> torch.dtype | None:
    if isinstance(hypernetwork, nn.Module):
        for p in hypernetwork.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _has_modules_for(hypernetwork: object, width: int) -> bool:
    # Fast path: skip casts and calls for widths the network has no modules for. Without a usable `sizes`
    # attribute we call forward_kv, which passes unknown widths through by contract.
    sizes = getattr(hypernetwork, "sizes", None)
    if isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes):
        return width in sizes
    return True


def apply_hypernetworks(hypernetworks: Sequence[SupportsForwardKV], context: Tensor) -> tuple[Tensor, Tensor]:
    """Return (k_input, v_input) = (HNn_k(...HN1_k(ctx)), HNn_v(...HN1_v(ctx))), in `context`'s dtype.

    Each network applies its own multiplier. The K path of a later network sees the K output of the earlier
    one and the V path the V output; as K and V are separate MLPs fed the same input, `forward_kv(k)[0]` and
    `forward_kv(v)[1]` are exactly the per-path calls.
    """
    width = context.shape[-1]
    k = v = context
    for hn in hypernetworks:
        if not _has_modules_for(hn, width):
            continue
        # Hypernetwork weights may be fp32 under an fp16/bf16 UNet: run them in their own dtype.
        dtype = _param_dtype(hn)
        if k is v:  # paths not yet split: one call serves both
            x = k if dtype is None else k.to(dtype)
            k, v = hn.forward_kv(x)
        else:
            k = hn.forward_kv(k if dtype is None else k.to(dtype))[0]
            v = hn.forward_kv(v if dtype is None else v.to(dtype))[1]
    return k.to(context.dtype), v.to(context.dtype)


def shareable(hypernetworks: Sequence[SupportsForwardKV]) -> bool:
    """Whether the networks give the same output every time they see the same tensor (so one call can serve all).

    Objects that are not nn.Modules cannot be inspected, so they are never shared.
    """
    for hn in hypernetworks:
        if not isinstance(hn, nn.Module):
            return False
        for module in hn.modules():
            if module.training and isinstance(module, STOCHASTIC_IN_TRAINING) and getattr(module, "p", 1.0) != 0:
                return False
            # hypernet.input_noise: each layer draws its own noise in training, as it draws its own dropout mask
            if module.training and getattr(module, "input_noise", 0.0) > 0:
                return False
    return True


def _state(hypernetworks: Sequence[SupportsForwardKV]) -> tuple:
    # What the output depends on besides the weights (which cannot change inside one forward): the multiplier
    # and train/eval mode (train uses strength 1), plus grad mode (a no_grad result has no graph to backprop).
    return (
        torch.is_grad_enabled(),
        *((float(hn.multiplier), bool(getattr(hn, "training", False))) for hn in hypernetworks),
    )


@dataclass(frozen=True, eq=False)
class SharedContextKV:
    """K/V inputs made from `context` by `hypernetworks` at the start of one UNet forward."""

    context: Tensor
    version: int  # context._version when computed: an in-place change of the context invalidates the result
    hypernetworks: tuple[SupportsForwardKV, ...]
    state: tuple
    k: Tensor
    v: Tensor

    def serves(self, context: Tensor, hypernetworks: tuple[SupportsForwardKV, ...]) -> bool:
        """True iff (k, v) is exactly what apply_hypernetworks(hypernetworks, context) would return now."""
        if context is not self.context or len(hypernetworks) != len(self.hypernetworks):
            return False
        # The same networks in the same order (element-wise: torch.compile cannot trace `is` on tuples).
        if not all(a is b for a, b in zip(hypernetworks, self.hypernetworks, strict=True)):
            return False
        # Under torch.compile the version counter is not traceable; a compiled UNet forward cannot mutate its
        # own input between the pre-hook and the attention layers anyway.
        if not torch.compiler.is_compiling() and context._version != self.version:
            return False
        return _state(hypernetworks) == self.state


def share_context_kv(hypernetworks: tuple[SupportsForwardKV, ...], context: Tensor) -> SharedContextKV | None:
    """Compute the K/V inputs for `context` once, or None when they may not be shared (see `shareable`)."""
    if not hypernetworks or not shareable(hypernetworks):
        return None
    if not any(_has_modules_for(hn, context.shape[-1]) for hn in hypernetworks):
        return None
    k, v = apply_hypernetworks(hypernetworks, context)
    version = 0 if torch.compiler.is_compiling() else context._version
    return SharedContextKV(context, version, hypernetworks, _state(hypernetworks), k, v)
