"""Apply hypernetworks to the K and V inputs of a diffusers UNet's attention layers.

A1111/NovelAI semantics (spec section 3): in every attention layer the context (the normed hidden states for
self-attention, the text conditioning for cross-attention) goes through the hypernetwork modules chosen by the
context's last-dim width before `to_k` / `to_v`; q is untouched; several networks stack in order, per path.

The hypernetworks are held by a plain-object processor, never as sub-modules of the UNet, so the UNet's
`state_dict` is unchanged while they are attached (A1111 issue #2676).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "HypernetworkAttnProcessor",
    "SupportsForwardKV",
    "apply_hypernetworks",
    "attach_hypernetworks",
    "detach_hypernetworks",
    "hypernetworks_attached",
    "unet_attention_widths",
]


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


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


class HypernetworkAttnProcessor:
    """Attention processor: hypernetworks on the K/V inputs, then torch scaled_dot_product_attention.

    Deliberately not an nn.Module, so the hypernetworks it references never become UNet sub-modules.
    `original` is the processor that was installed before attach; detach puts it back.
    """

    def __init__(self, hypernetworks: Sequence[SupportsForwardKV] = (), original: object | None = None):
        self.hypernetworks: tuple[SupportsForwardKV, ...] = tuple(hypernetworks)
        self.original = original

    def __repr__(self) -> str:
        names = [getattr(hn, "name", type(hn).__name__) for hn in self.hypernetworks]
        return f"{type(self).__name__}(hypernetworks={names})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        image_shape = None
        if hidden_states.ndim == 4:  # (B, C, H, W) from ResNet-style attention blocks -> (B, H*W, C)
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        query = attn.to_q(hidden_states)
        # The hypernetworks see exactly what to_k / to_v would have seen.
        k_input, v_input = apply_hypernetworks(self.hypernetworks, context)
        key = attn.to_k(k_input)
        value = attn.to_v(v_input)

        q = _split_heads(query, attn.heads)
        k = _split_heads(key, attn.heads)
        v = _split_heads(value, attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            # (B*heads, Lq|1, Lk) -> (B, heads, Lq|1, Lk) as scaled_dot_product_attention expects
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.upcast_attention and q.dtype == torch.float16:
            # SD2.x sets upcast_attention because fp16 attention scores overflow.
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout

        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _unsupported_reason(attn: Attention) -> str | None:
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return "it uses added K/V projections (SimpleCrossAttn blocks)"
    if attn.to_k is None or attn.to_v is None or getattr(attn, "to_out", None) is None:
        return "it has no to_k/to_v/to_out projections"
    return None


def _attention_modules(unet: nn.Module) -> Iterator[tuple[str, Attention]]:
    """The diffusers Attention modules this processor can drive; warns about the others."""
    found = False
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        found = True
        reason = _unsupported_reason(module)
        if reason is not None:
            log.warning("hypernetworks are not applied to attention layer %s: %s", name, reason)
            continue
        yield name, module
    if not found:
        raise ValueError(
            f"no diffusers Attention modules found in {type(unet).__name__}; "
            "hypernetworks attach to a UNet (e.g. UNet2DConditionModel)"
        )


def _check_hypernetworks(hypernetworks: Sequence[SupportsForwardKV]) -> tuple[SupportsForwardKV, ...]:
    if hasattr(hypernetworks, "forward_kv") or isinstance(hypernetworks, (str, bytes)):
        raise ValueError(
            f"hypernetworks must be a list of hypernetworks, got a single {type(hypernetworks).__name__}; "
            "wrap it in a list"
        )
    try:
        result = tuple(hypernetworks)
    except TypeError:
        raise ValueError(f"hypernetworks must be a list of hypernetworks, got {type(hypernetworks).__name__}") from None
    for i, hn in enumerate(result):
        if not callable(getattr(hn, "forward_kv", None)):
            raise ValueError(
                f"hypernetworks[{i}] ({type(hn).__name__}) has no forward_kv(context) method; "
                "expected a hyperlit.hypernetwork.Hypernetwork"
            )
    return result


def attach_hypernetworks(unet: nn.Module, hypernetworks: Sequence[SupportsForwardKV]) -> None:
    """Install a HypernetworkAttnProcessor applying `hypernetworks` (in order) on every UNet attention layer.

    Attaching again replaces the hypernetworks but keeps the processors from before the first attach, so
    `detach_hypernetworks` always restores those. An empty list still installs the processor (plain SDPA).
    """
    hypernetworks = _check_hypernetworks(hypernetworks)
    for _, attn in _attention_modules(unet):
        current = attn.processor
        original = current.original if isinstance(current, HypernetworkAttnProcessor) else current
        attn.set_processor(HypernetworkAttnProcessor(hypernetworks, original))


def detach_hypernetworks(unet: nn.Module) -> None:
    """Put back the exact processor objects that were installed before `attach_hypernetworks`."""
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, HypernetworkAttnProcessor):
            module.set_processor(module.processor.original)


@contextmanager
def hypernetworks_attached(unet: nn.Module, hypernetworks: Sequence[SupportsForwardKV]) -> Iterator[nn.Module]:
    """Attach for the duration of a `with` block, then restore the processors found on entry (nests)."""
    before = {m: m.processor for m in unet.modules() if isinstance(m, Attention)}
    attach_hypernetworks(unet, hypernetworks)
    try:
        yield unet
    finally:
        for module, processor in before.items():
            module.set_processor(processor)


def unet_attention_widths(unet: nn.Module) -> dict[str, list[int]]:
    """Context widths the UNet's attention layers feed to to_k/to_v: {"self": [...], "cross": [...]}, sorted.

    These are the hypernetwork sizes that can ever be used (e.g. SD1: self 320/640/1280, cross 768).
    """
    widths: dict[str, set[int]] = {"self": set(), "cross": set()}
    for _, attn in _attention_modules(unet):
        kind = "cross" if attn.is_cross_attention else "self"
        widths[kind].add(attn.to_k.in_features)
    return {kind: sorted(values) for kind, values in widths.items()}
