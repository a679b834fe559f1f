"""Apply hypernetworks to the K and V inputs of a diffusers UNet's attention layers.

A1111/NovelAI semantics (spec section 3): in every attention layer the context (the normed hidden states for
self-attention, the text conditioning for cross-attention) goes through the hypernetwork modules chosen by the
context's last-dim width before `to_k` / `to_v`; q is untouched; several networks stack in order, per path.

The hypernetworks are held by a plain-object processor, never as sub-modules of the UNet, so the UNet's
`state_dict` is unchanged while they are attached (A1111 issue #2676).

Text context computed once: a forward pre-hook on the UNet computes the K/V inputs for `encoder_hidden_states`
before any block runs and hands them to every attention layer through `cross_attention_kwargs` (diffusers passes
those down to each processor). Riding on the call's own arguments, they cannot outlive that forward; computed
outside every block, they are not recomputed when a gradient-checkpointed block re-runs its forward in backward
(that re-run receives the same kwargs object, hence the same tensors).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from hyperlit.kv_inputs import SharedContextKV, SupportsForwardKV, apply_hypernetworks, share_context_kv

log = logging.getLogger(__name__)

__all__ = [
    "HypernetworkAttnProcessor",
    "SupportsForwardKV",
    "apply_hypernetworks",
    "attach_hypernetworks",
    "detach_hypernetworks",
    "hypernetworks_attached",
    "sharing_text_context",
    "unet_attention_widths",
]

# The cross_attention_kwargs key (and processor argument) carrying the per-forward SharedContextKV.
SHARED_KV_KWARG = "hypernetwork_kv"


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
        hypernetwork_kv: SharedContextKV | None = None,
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
        if hypernetwork_kv is not None and hypernetwork_kv.serves(context, self.hypernetworks):
            k_input, v_input = hypernetwork_kv.k, hypernetwork_kv.v
        else:
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


def _all_attention(unet: nn.Module) -> list[tuple[str, Attention]]:
    found = [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)]
    if not found:
        raise ValueError(
            f"no diffusers Attention modules found in {type(unet).__name__}; "
            "hypernetworks attach to a UNet (e.g. UNet2DConditionModel)"
        )
    return found


def _attention_modules(unet: nn.Module) -> Iterator[tuple[str, Attention]]:
    """The diffusers Attention modules this processor can drive; warns about the others."""
    for name, module in _all_attention(unet):
        reason = _unsupported_reason(module)
        if reason is not None:
            log.warning("hypernetworks are not applied to attention layer %s: %s", name, reason)
            continue
        yield name, module


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


class _ShareTextContext:
    """UNet forward pre-hook: K/V inputs of the text context, once, passed down in cross_attention_kwargs."""

    def __init__(self, hypernetworks: tuple[SupportsForwardKV, ...], context_index: int, kwargs_index: int):
        self.hypernetworks = hypernetworks  # the networks the processors hold, in order: SharedContextKV.serves checks
        self.context_index = context_index
        self.kwargs_index = kwargs_index

    def __call__(self, unet: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if "encoder_hidden_states" in kwargs:
            context = kwargs["encoder_hidden_states"]
        elif len(args) > self.context_index:
            context = args[self.context_index]
        else:
            return args, kwargs
        if not isinstance(context, Tensor):
            return args, kwargs
        shared = share_context_kv(self.hypernetworks, context)
        if shared is None:
            return args, kwargs
        if len(args) > self.kwargs_index:  # cross_attention_kwargs given positionally
            args = (
                *args[: self.kwargs_index],
                {**(args[self.kwargs_index] or {}), SHARED_KV_KWARG: shared},
                *args[self.kwargs_index + 1 :],
            )
        else:
            kwargs = {
                **kwargs,
                "cross_attention_kwargs": {**(kwargs.get("cross_attention_kwargs") or {}), SHARED_KV_KWARG: shared},
            }
        return args, kwargs


# unet -> (hook, handle): at most one sharing hook per UNet; weak so a dropped UNet is not kept alive.
_SHARING: weakref.WeakKeyDictionary[nn.Module, tuple[_ShareTextContext, Any]] = weakref.WeakKeyDictionary()


def _positions(forward: Callable) -> tuple[int, int] | None:
    names = list(inspect.signature(forward).parameters)
    if "encoder_hidden_states" not in names or "cross_attention_kwargs" not in names:
        return None
    return names.index("encoder_hidden_states"), names.index("cross_attention_kwargs")


def _set_sharing(unet: nn.Module, hook: _ShareTextContext | None) -> None:
    previous = _SHARING.pop(unet, None)
    if previous is not None:
        previous[1].remove()
    if hook is not None:
        _SHARING[unet] = (hook, unet.register_forward_pre_hook(hook, with_kwargs=True))


def sharing_text_context(unet: nn.Module) -> bool:
    """Whether the UNet computes the text context's K/V inputs once per forward (else once per layer)."""
    return unet in _SHARING


def attach_hypernetworks(
    unet: nn.Module, hypernetworks: Sequence[SupportsForwardKV], share_text_context: bool = True
) -> None:
    """Install a HypernetworkAttnProcessor applying `hypernetworks` (in order) on every UNet attention layer.

    Attaching again replaces the hypernetworks but keeps the processors from before the first attach, so
    `detach_hypernetworks` always restores those. An empty list still installs the processor (plain SDPA).
    `share_text_context=False` computes the text context's K/V inputs in every cross-attention layer, as A1111
    does (same result, more work); otherwise once per UNet forward when that is exact (see hyperlit.kv_inputs).
    """
    hypernetworks = _check_hypernetworks(hypernetworks)
    attention = _all_attention(unet)
    supported = list(_attention_modules(unet))
    for _, attn in supported:
        current = attn.processor
        original = current.original if isinstance(current, HypernetworkAttnProcessor) else current
        attn.set_processor(HypernetworkAttnProcessor(hypernetworks, original))
    positions = _positions(unet.forward)
    # Layers left with their own processor would warn about the unknown cross_attention_kwargs key on every call.
    if share_text_context and hypernetworks and positions is not None and len(supported) == len(attention):
        _set_sharing(unet, _ShareTextContext(hypernetworks, *positions))
    else:
        _set_sharing(unet, None)


def detach_hypernetworks(unet: nn.Module) -> None:
    """Put back the exact processor objects that were installed before `attach_hypernetworks`."""
    _set_sharing(unet, None)
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, HypernetworkAttnProcessor):
            module.set_processor(module.processor.original)


@contextmanager
def hypernetworks_attached(
    unet: nn.Module, hypernetworks: Sequence[SupportsForwardKV], share_text_context: bool = True
) -> Iterator[nn.Module]:
    """Attach for the duration of a `with` block, then restore the processors found on entry (nests)."""
    before = {m: m.processor for m in unet.modules() if isinstance(m, Attention)}
    hook_before = _SHARING.get(unet, (None, None))[0]
    attach_hypernetworks(unet, hypernetworks, share_text_context)
    try:
        yield unet
    finally:
        for module, processor in before.items():
            module.set_processor(processor)
        _set_sharing(unet, hook_before)


def unet_attention_widths(unet: nn.Module) -> dict[str, list[int]]:
    """Context widths the UNet's attention layers feed to to_k/to_v: {"self": [...], "cross": [...]}, sorted.

    These are the hypernetwork sizes that can ever be used (e.g. SD1: self 320/640/1280, cross 768).
    """
    widths: dict[str, set[int]] = {"self": set(), "cross": set()}
    for _, attn in _attention_modules(unet):
        kind = "cross" if attn.is_cross_attention else "self"
        widths[kind].add(attn.to_k.in_features)
    return {kind: sorted(values) for kind, values in widths.items()}
