"""Audit (issue 14, mutmut survivors of hyperlit.attention and hyperlit.kv_inputs).

Stacks with a network lacking the layer's width, mixed-dtype stacks, networks without a `sizes` list, layers the
processor cannot drive, non-default attention scales, masks with one row per query, fp16 with upcast_attention,
the sharing hook on forwards shaped differently from the SD UNet's, and every message.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from helpers.attention_models import CROSS_WIDTH, CrossCalls, ToyHypernetwork, real_hypernetwork
from torch import Tensor, nn

from hyperlit.attention import (
    HypernetworkAttnProcessor,
    attach_hypernetworks,
    detach_hypernetworks,
    sharing_text_context,
    unet_attention_widths,
)
from hyperlit.kv_inputs import SharedContextKV, apply_hypernetworks, share_context_kv, shareable


class CountingToy(ToyHypernetwork):
    def __init__(self, sizes: list[int], seed: int = 0):
        super().__init__(sizes, seed=seed)
        self.calls = 0

    def forward_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        return super().forward_kv(context)


class NoSizes:
    """A hypernetwork that is not an nn.Module and has no `sizes`: forward_kv decides per width."""

    multiplier = 1.0

    def forward_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return context * 2, context * 3


def context(seed: int = 0, width: int = CROSS_WIDTH) -> Tensor:
    return torch.randn(2, 5, width, generator=torch.Generator().manual_seed(seed))


# --- apply_hypernetworks / shareable ---


def test_a_network_without_the_width_is_skipped_and_later_networks_still_apply():
    ctx = context(1)
    absent, present = CountingToy([999], seed=2), ToyHypernetwork([CROSS_WIDTH], seed=3)
    k, v = apply_hypernetworks([absent, present], ctx)
    torch.testing.assert_close(k, present.path("k", ctx))
    torch.testing.assert_close(v, present.path("v", ctx))
    assert absent.calls == 0  # not even called: its sizes say it has nothing for this width


def test_a_network_without_a_sizes_list_is_always_called():
    ctx = context(4)
    k, v = apply_hypernetworks([NoSizes()], ctx)
    assert torch.equal(k, ctx * 2) and torch.equal(v, ctx * 3)
    named = NoSizes()
    named.sizes = [str(CROSS_WIDTH)]  # not a list of ints: not usable to skip the call
    k, v = apply_hypernetworks([named], ctx)
    assert torch.equal(k, ctx * 2) and torch.equal(v, ctx * 3)


def test_a_later_network_runs_in_its_own_dtype_on_split_paths():
    # hn1 in bf16 splits K from V; hn2's fp32 weights must get fp32 inputs on each path, then the result the
    # context's dtype
    ctx = context(5)
    hn1, hn2 = ToyHypernetwork([CROSS_WIDTH], seed=6).to(torch.bfloat16), ToyHypernetwork([CROSS_WIDTH], seed=7)
    k, v = apply_hypernetworks([hn1, hn2], ctx)
    low = ctx.to(torch.bfloat16)
    for which, got in (("k", k), ("v", v)):
        expected = hn2.path(which, hn1.path(which, low).float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=3e-2)  # bf16 rounding of hn1


def test_dropout_with_p_zero_or_in_eval_is_shareable_and_rrelu_in_training_is_not():
    def net(module: nn.Module) -> nn.Module:
        hn = ToyHypernetwork([CROSS_WIDTH])
        hn.extra = module
        return hn.train()

    assert shareable([net(nn.Dropout(p=0.0))])  # p = 0 draws nothing
    assert not shareable([net(nn.Dropout(p=0.1))])
    assert not shareable([net(nn.RReLU())])  # random slope in training, and no `p`
    assert shareable([net(nn.RReLU()).eval()])
    assert not shareable([NoSizes()])  # not an nn.Module: cannot be inspected
    shared = share_context_kv((net(nn.Dropout(p=0.0)),), context(8))
    assert isinstance(shared, SharedContextKV)


# --- the processor on options the SD UNet does not use ---


def attention(**options) -> Attention:
    torch.manual_seed(20)
    return Attention(query_dim=32, cross_attention_dim=CROSS_WIDTH, heads=4, dim_head=8, **options).eval()


def by_default_processor(attn: Attention, *args, **kwargs) -> Tensor:
    return AttnProcessor2_0()(attn, *args, **kwargs)


def test_a_layer_without_qk_scaling_matches_the_default_processor():
    attn = attention(scale_qk=False)  # scale 1, not dim_head ** -0.5
    assert attn.scale == 1.0
    gen = torch.Generator().manual_seed(21)
    x, ctx = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 5, CROSS_WIDTH, generator=gen)
    ours = HypernetworkAttnProcessor([])(attn, x, encoder_hidden_states=ctx)
    # diffusers' AttnProcessor applies attn.scale (AttnProcessor2_0 ignores it and always uses dim_head ** -0.5)
    expected = AttnProcessor()(attn, x, encoder_hidden_states=ctx)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    default_scale = HypernetworkAttnProcessor([])(attention(), x, encoder_hidden_states=ctx)
    assert not torch.allclose(ours, default_scale, atol=1e-3)


def test_a_mask_with_one_row_per_query_matches_the_default_processor():
    attn = attention()
    gen = torch.Generator().manual_seed(22)
    x, ctx = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 5, CROSS_WIDTH, generator=gen)
    mask = torch.zeros(2, 6, 5)
    mask[0, :3, 3:] = -10000.0  # the first three queries of sample 0 see only the first three tokens
    expected = by_default_processor(attn, x, encoder_hidden_states=ctx, attention_mask=mask)
    assert not torch.allclose(expected, by_default_processor(attn, x, encoder_hidden_states=ctx), atol=1e-4)
    ours = HypernetworkAttnProcessor([])(attn, x, encoder_hidden_states=ctx, attention_mask=mask)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_fp16_with_upcast_attention_equals_the_fp32_computation():
    attn = attention(upcast_attention=True)
    gen = torch.Generator().manual_seed(23)
    x, ctx = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 5, CROSS_WIDTH, generator=gen)
    half = attention(upcast_attention=True).half()
    x16, ctx16 = x.half(), ctx.half()
    out = HypernetworkAttnProcessor([])(half, x16, encoder_hidden_states=ctx16)
    assert out.dtype == torch.float16
    # reference: the same fp16 weights and inputs, computed in fp32
    with torch.no_grad():
        for p32, p16 in zip(attn.parameters(), half.parameters(), strict=True):
            p32.copy_(p16.float())
        reference = HypernetworkAttnProcessor([])(attn, x16.float(), encoder_hidden_states=ctx16.float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-3, atol=2e-3)


def test_repr_names_the_networks_in_order():
    named = real_hypernetwork()
    named.name = "style"
    processor = HypernetworkAttnProcessor([named, ToyHypernetwork([CROSS_WIDTH])])
    assert repr(processor) == "HypernetworkAttnProcessor(hypernetworks=['style', 'ToyHypernetwork'])"


# --- layers the processor cannot drive ---


def unsupported_layers() -> nn.ModuleDict:
    """Unsupported layers first, so a loop that stops at the first one would leave the last layer alone."""
    added_kv = attention(added_kv_proj_dim=16)
    no_v = attention()
    no_v.to_v = None
    no_out = attention()
    del no_out.to_out
    return nn.ModuleDict({"added": added_kv, "no_v": no_v, "no_out": no_out, "plain": attention()})


def test_unsupported_layers_keep_their_processor_and_are_named_in_a_warning(caplog):
    layers = unsupported_layers()
    before = {name: layer.processor for name, layer in layers.items()}
    hn = ToyHypernetwork([CROSS_WIDTH])
    with caplog.at_level(logging.WARNING, logger="hyperlit.attention"):
        attach_hypernetworks(layers, [hn])
    assert [record.getMessage() for record in caplog.records] == [
        "hypernetworks are not applied to attention layer added: it uses added K/V projections (SimpleCrossAttn "
        "blocks)",
        "hypernetworks are not applied to attention layer no_v: it has no to_k/to_v/to_out projections",
        "hypernetworks are not applied to attention layer no_out: it has no to_k/to_v/to_out projections",
    ]
    for name in ("added", "no_v", "no_out"):
        assert layers[name].processor is before[name]
    assert isinstance(layers["plain"].processor, HypernetworkAttnProcessor)
    assert layers["plain"].processor.hypernetworks == (hn,)
    assert unet_attention_widths(layers) == {"self": [], "cross": [CROSS_WIDTH]}  # the plain layer only
    detach_hypernetworks(layers)
    assert all(layer.processor is before[name] for name, layer in layers.items())


def test_argument_errors_name_what_was_passed():
    hn = ToyHypernetwork([CROSS_WIDTH])
    layer = nn.ModuleDict({"attn": attention()})
    cases = [
        (hn, "hypernetworks must be a list of hypernetworks, got a single ToyHypernetwork; wrap it in a list"),
        ("hn.pt", "hypernetworks must be a list of hypernetworks, got a single str; wrap it in a list"),
        (5, "hypernetworks must be a list of hypernetworks, got int"),
        (
            [hn, 3],
            "hypernetworks[1] (int) has no forward_kv(context) method; expected a hyperlit.hypernetwork.Hypernetwork",
        ),
    ]
    for value, message in cases:
        with pytest.raises(ValueError) as info:
            attach_hypernetworks(layer, value)
        assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        attach_hypernetworks(nn.Linear(2, 2), [hn])
    assert str(info.value) == (
        "no diffusers Attention modules found in Linear; hypernetworks attach to a UNet (e.g. UNet2DConditionModel)"
    )


# --- the text-context sharing hook on forwards shaped unlike the SD UNet's ---


class OneLayer(nn.Module):
    """A one-attention "UNet" whose forward takes the context and cross_attention_kwargs by position or keyword."""

    def __init__(self):
        super().__init__()
        self.attn = attention()
        self.default_context = torch.randn(2, 5, CROSS_WIDTH, generator=torch.Generator().manual_seed(30))
        self.seen: list[tuple[dict | None, object]] = []

    def forward(self, hidden, encoder_hidden_states=None, cross_attention_kwargs=None, extra=None):
        self.seen.append((cross_attention_kwargs, extra))
        ours = {k: v for k, v in (cross_attention_kwargs or {}).items() if k == "hypernetwork_kv"}
        context = self.default_context if encoder_hidden_states is None else encoder_hidden_states
        return self.attn(hidden, encoder_hidden_states=context, **ours)


class NoKwargsArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = attention()

    def forward(self, hidden, encoder_hidden_states=None):
        return self.attn(hidden, encoder_hidden_states=encoder_hidden_states)


def test_sharing_hook_with_positional_and_keyword_arguments():
    model = OneLayer()
    hn = real_hypernetwork(seed=24).eval()
    gen = torch.Generator().manual_seed(25)
    x, ctx = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 5, CROSS_WIDTH, generator=gen)
    expected = HypernetworkAttnProcessor([hn])(model.attn, x, encoder_hidden_states=ctx)
    default_expected = HypernetworkAttnProcessor([hn])(model.attn, x, encoder_hidden_states=model.default_context)
    attach_hypernetworks(model, [hn])
    assert sharing_text_context(model)
    counter = CrossCalls(hn)
    calls = []
    try:
        outputs = {
            "no context": model(x),
            "context positional": model(x, ctx),
            "kwargs positional None": model(x, ctx, None),
            "kwargs positional": model(x, ctx, {"marker": 1}, "E"),
            "kwargs keyword": model(x, encoder_hidden_states=ctx, cross_attention_kwargs={"marker": 2}),
        }
        calls.append(counter.count)
    finally:
        counter.remove()
        detach_hypernetworks(model)
    torch.testing.assert_close(outputs.pop("no context"), default_expected, rtol=0, atol=1e-6)
    for name, out in outputs.items():
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6, msg=name)
    assert calls == [5]  # once per forward: the hook's (with a context) or the layer's (without)
    seen = [(None if kwargs is None else {k: type(v).__name__ for k, v in kwargs.items()}, extra)
            for kwargs, extra in model.seen]  # fmt: skip
    assert seen == [
        (None, None),
        ({"hypernetwork_kv": "SharedContextKV"}, None),
        ({"hypernetwork_kv": "SharedContextKV"}, None),
        ({"marker": "int", "hypernetwork_kv": "SharedContextKV"}, "E"),
        ({"marker": "int", "hypernetwork_kv": "SharedContextKV"}, None),
    ]


def test_a_context_changed_in_place_before_the_forward_is_still_shared():
    model = OneLayer()
    hn = real_hypernetwork(seed=26).eval()
    ctx = torch.randn(2, 5, CROSS_WIDTH, generator=torch.Generator().manual_seed(27))
    ctx.mul_(2.0)  # its version counter is now 1
    x = torch.randn(2, 6, 32)
    expected = HypernetworkAttnProcessor([hn])(model.attn, x, encoder_hidden_states=ctx)
    attach_hypernetworks(model, [hn])
    counter = CrossCalls(hn)
    try:
        out = model(x, ctx)
    finally:
        counter.remove()
        detach_hypernetworks(model)
    assert counter.count == 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_a_forward_without_cross_attention_kwargs_gets_no_sharing_hook():
    model = NoKwargsArgument()
    hn = real_hypernetwork(seed=28).eval()
    gen = torch.Generator().manual_seed(29)
    x, ctx = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 5, CROSS_WIDTH, generator=gen)
    expected = HypernetworkAttnProcessor([hn])(model.attn, x, encoder_hidden_states=ctx)
    attach_hypernetworks(model, [hn])
    try:
        assert not sharing_text_context(model)
        torch.testing.assert_close(model(x, ctx), expected, rtol=0, atol=0)
    finally:
        detach_hypernetworks(model)
