"""Tests for hyperlit.attention: hypernetworks on the K/V inputs of every UNet attention layer."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from helpers.attention_models import CROSS_WIDTH, SELF_WIDTHS, ToyHypernetwork, make_unet
from torch import Tensor, nn

from hyperlit.attention import (
    HypernetworkAttnProcessor,
    apply_hypernetworks,
    attach_hypernetworks,
    detach_hypernetworks,
    hypernetworks_attached,
    unet_attention_widths,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return make_unet()


@pytest.fixture(scope="module")
def inputs() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 7, CROSS_WIDTH, generator=gen),
    }


def run(unet: UNet2DConditionModel, inputs: dict[str, Tensor]) -> Tensor:
    return unet(**inputs).sample


def attention_modules(unet: nn.Module) -> list[Attention]:
    return [m for m in unet.modules() if isinstance(m, Attention)]


def hand_attention(attn: Attention, x: Tensor, k_in: Tensor, v_in: Tensor) -> Tensor:
    """softmax(q k^T * d^-0.5) v for one diffusers Attention (no bias, no norms), by einsum."""
    h = attn.heads
    q = x @ attn.to_q.weight.T
    k = k_in @ attn.to_k.weight.T
    v = v_in @ attn.to_v.weight.T
    b, lq, inner = q.shape
    d = inner // h
    q, k, v = (t.reshape(b, -1, h, d) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, lq, inner)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_widths_come_from_the_attention_modules(unet):
    assert unet_attention_widths(unet) == {"self": SELF_WIDTHS, "cross": [CROSS_WIDTH]}


def test_no_hypernetworks_matches_default_processor(unet, inputs):
    reference = run(unet, inputs)
    with hypernetworks_attached(unet, []):
        assert all(isinstance(m.processor, HypernetworkAttnProcessor) for m in attention_modules(unet))
        ours = run(unet, inputs)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", ["attn1", "attn2"])
def test_one_layer_against_hand_computation(unet, layer):
    attn: Attention = getattr(unet.down_blocks[1].attentions[0].transformer_blocks[0], layer)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 64, generator=gen)
    ctx = x if layer == "attn1" else torch.randn(2, 7, CROSS_WIDTH, generator=gen)
    hn = ToyHypernetwork([64, CROSS_WIDTH], multiplier=0.7, seed=3)
    processor = HypernetworkAttnProcessor([hn])
    ehs = None if layer == "attn1" else ctx
    out = processor(attn, x, encoder_hidden_states=ehs)
    expected = hand_attention(attn, x, hn.path("k", ctx), hn.path("v", ctx))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the network really changed something, else the comparison above proves nothing about it
    assert not torch.allclose(out, hand_attention(attn, x, ctx, ctx), atol=1e-3)


def test_multiplier_zero_equals_bare_unet(unet, inputs):
    reference = run(unet, inputs)
    hn = ToyHypernetwork(SELF_WIDTHS + [CROSS_WIDTH], multiplier=0.0).eval()
    with hypernetworks_attached(unet, [hn]):
        zero = run(unet, inputs)
        hn.multiplier = 1.0
        one = run(unet, inputs)
    torch.testing.assert_close(zero, reference, rtol=0, atol=1e-5)
    assert (one - reference).abs().max() > 1e-2


def test_stacking_order_is_per_path_and_in_order(unet):
    gen = torch.Generator().manual_seed(4)
    ctx = torch.randn(2, 7, CROSS_WIDTH, generator=gen)
    hn1 = ToyHypernetwork([CROSS_WIDTH], multiplier=0.8, seed=5)
    hn2 = ToyHypernetwork([CROSS_WIDTH], multiplier=1.3, seed=6)
    k, v = apply_hypernetworks([hn1, hn2], ctx)
    torch.testing.assert_close(k, hn2.path("k", hn1.path("k", ctx)))
    torch.testing.assert_close(v, hn2.path("v", hn1.path("v", ctx)))
    assert not torch.allclose(k, hn1.path("k", hn2.path("k", ctx)), atol=1e-3)  # the order matters
    assert not torch.allclose(k, hn2.path("k", hn1.path("v", ctx)), atol=1e-3)  # K path never sees V output

    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    x = torch.randn(2, 16, 32, generator=gen)
    out = HypernetworkAttnProcessor([hn1, hn2])(attn, x, encoder_hidden_states=ctx)
    expected = hand_attention(attn, x, hn2.path("k", hn1.path("k", ctx)), hn2.path("v", hn1.path("v", ctx)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def record_kv_inputs(unet: nn.Module) -> tuple[list[tuple[Attention, Tensor, Tensor, Tensor]], list]:
    """Per attention call: (module, context it was given, input of to_k, input of to_v)."""
    records: list = []
    handles = []
    for attn in attention_modules(unet):

        def pre(module, args, kwargs, attn=attn):
            ehs = kwargs.get("encoder_hidden_states")
            records.append([attn, args[0] if ehs is None else ehs, None, None])

        def on_k(module, args, attn=attn):
            assert records[-1][0] is attn
            records[-1][2] = args[0]

        def on_v(module, args, attn=attn):
            records[-1][3] = args[0]

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.to_k.register_forward_pre_hook(on_k))
        handles.append(attn.to_v.register_forward_pre_hook(on_v))
    return records, handles


@pytest.mark.parametrize(
    "sizes, changed",
    [([CROSS_WIDTH], {"cross"}), ([32], {"self32"}), (SELF_WIDTHS, {"self32", "self64"}), ([999], set())],
)
def test_width_routing(unet, inputs, sizes, changed):
    hn = ToyHypernetwork(sizes, seed=7)
    records, handles = record_kv_inputs(unet)
    try:
        with hypernetworks_attached(unet, [hn]):
            out = run(unet, inputs)
    finally:
        for h in handles:
            h.remove()
    assert len(records) == len(attention_modules(unet))  # every attention layer ran through our processor
    seen_changed = set()
    for attn, ctx, k_in, v_in in records:
        width = ctx.shape[-1]
        kind = "cross" if attn.is_cross_attention else f"self{width}"
        if width in sizes:
            seen_changed.add(kind)
            torch.testing.assert_close(k_in, hn.path("k", ctx))
            torch.testing.assert_close(v_in, hn.path("v", ctx))
            assert not torch.allclose(k_in, ctx, atol=1e-3)
        else:
            assert torch.equal(k_in, ctx) and torch.equal(v_in, ctx)
    assert seen_changed == changed
    if not changed:  # a width with no modules anywhere: the UNet output is that of plain SDPA
        with hypernetworks_attached(unet, []):
            torch.testing.assert_close(out, run(unet, inputs), rtol=0, atol=0)


def test_detach_restores_exact_processors_and_output(inputs):
    unet = make_unet()
    originals = {name: proc for name, proc in unet.attn_processors.items()}
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    before = run(unet, inputs)

    hn1, hn2 = ToyHypernetwork(SELF_WIDTHS + [CROSS_WIDTH], seed=8), ToyHypernetwork([CROSS_WIDTH], seed=9)
    attach_hypernetworks(unet, [hn1])
    attach_hypernetworks(unet, [hn1, hn2])  # twice without detach: originals must survive
    assert list(unet.state_dict()) == list(state_before)  # no hypernetwork keys leak into the UNet
    assert not any(p is q for p in unet.parameters() for q in hn1.parameters())
    assert all(m.processor.hypernetworks == (hn1, hn2) for m in attention_modules(unet))
    attached = run(unet, inputs)
    assert (attached - before).abs().max() > 1e-2

    detach_hypernetworks(unet)
    after = unet.attn_processors
    assert after.keys() == originals.keys()
    assert all(after[name] is originals[name] for name in originals)
    assert torch.equal(run(unet, inputs), before)
    assert all(torch.equal(v, state_before[k]) for k, v in unet.state_dict().items())
    detach_hypernetworks(unet)  # detaching a bare UNet is a no-op
    assert all(unet.attn_processors[name] is originals[name] for name in originals)


def test_context_manager_nests_and_restores(unet, inputs):
    originals = unet.attn_processors
    hn = ToyHypernetwork([CROSS_WIDTH], seed=10)
    with hypernetworks_attached(unet, [hn]):
        outer = dict(unet.attn_processors)
        with hypernetworks_attached(unet, []):
            assert all(p.hypernetworks == () for p in unet.attn_processors.values())
        assert all(unet.attn_processors[n] is outer[n] for n in outer)
    assert all(unet.attn_processors[n] is originals[n] for n in originals)


def test_gradients_reach_only_the_hypernetwork(unet, inputs):
    hn = ToyHypernetwork(SELF_WIDTHS + [CROSS_WIDTH], seed=11, scale=0.1).train()
    with hypernetworks_attached(unet, [hn]):
        loss = run(unet, inputs).pow(2).mean()
    loss.backward()
    for name, p in hn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in unet.parameters())


def test_low_precision_unet_with_fp32_hypernetwork(inputs):
    unet = make_unet()
    hn = ToyHypernetwork(SELF_WIDTHS + [CROSS_WIDTH], seed=12, scale=0.2)
    with hypernetworks_attached(unet, [hn]):
        reference = run(unet, inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = run(unet, inputs)
        unet.to(torch.bfloat16)
        bf16_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
        half = run(unet, bf16_inputs)  # fp32 hypernetwork weights inside a bf16 UNet
    assert hn.k["32"].weight.dtype == torch.float32
    assert half.dtype == torch.bfloat16
    scale = reference.abs().max()
    for out in (autocast, half):
        assert torch.isfinite(out).all()
        assert (out.float() - reference).abs().max() < 0.1 * scale


def test_apply_casts_to_hypernetwork_dtype_and_back():
    hn = ToyHypernetwork([CROSS_WIDTH], seed=13)
    ctx = torch.randn(1, 3, CROSS_WIDTH).to(torch.bfloat16)
    k, v = apply_hypernetworks([hn], ctx)
    assert k.dtype == v.dtype == torch.bfloat16
    torch.testing.assert_close(k, hn.path("k", ctx.float()).to(torch.bfloat16))


def test_bad_arguments_raise_clear_errors(unet):
    hn = ToyHypernetwork([CROSS_WIDTH])
    with pytest.raises(ValueError, match="wrap it in a list"):
        attach_hypernetworks(unet, hn)
    with pytest.raises(ValueError, match=r"hypernetworks\[1\].*forward_kv"):
        attach_hypernetworks(unet, [hn, object()])
    with pytest.raises(ValueError, match="no diffusers Attention modules"):
        attach_hypernetworks(nn.Linear(2, 2), [hn])
    assert not any(isinstance(m.processor, HypernetworkAttnProcessor) for m in attention_modules(unet))


def test_all_attention_options_match_default_processor():
    """Options the SD UNet does not use (group/cross/qk/spatial norms, residual, rescale, mask, 4-D input)."""
    torch.manual_seed(14)
    attn = Attention(
        query_dim=32,
        cross_attention_dim=CROSS_WIDTH,
        heads=4,
        dim_head=8,
        norm_num_groups=8,
        spatial_norm_dim=4,
        cross_attention_norm="layer_norm",
        qk_norm="layer_norm",
        residual_connection=True,
        rescale_output_factor=2.0,
        bias=True,
    ).eval()
    assert type(attn.processor).__name__ == "AttnProcessor2_0"
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 32, 4, 4, generator=gen)
    temb = torch.randn(2, 4, 2, 2, generator=gen)
    ctx = torch.randn(2, 7, CROSS_WIDTH, generator=gen)
    mask = torch.zeros(2, 1, 7)
    mask[0, :, 5:] = -10000.0  # the UNet's encoder_attention_mask bias convention
    expected = attn(x, encoder_hidden_states=ctx, attention_mask=mask, temb=temb)
    assert not torch.allclose(expected, attn(x, encoder_hidden_states=ctx, temb=temb), atol=1e-4)

    ours = HypernetworkAttnProcessor([])(attn, x, encoder_hidden_states=ctx, attention_mask=mask, temb=temb)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)

    # the hypernetwork sees the cross-normed context, exactly what to_k/to_v see
    hn = ToyHypernetwork([CROSS_WIDTH], seed=16)
    normed = attn.norm_cross(ctx)
    seen = []
    handle = attn.to_k.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    HypernetworkAttnProcessor([hn])(attn, x, encoder_hidden_states=ctx, attention_mask=mask, temb=temb)
    handle.remove()
    torch.testing.assert_close(seen[0], hn.path("k", normed))


def test_with_the_real_hypernetwork(unet, inputs):
    """hyperlit.hypernetwork.Hypernetwork: sizes from the UNet, eval multiplier, train strength 1, grads."""
    from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig

    widths = unet_attention_widths(unet)
    config = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", multiplier=0.0)
    hn = Hypernetwork(config, sizes=widths["self"] + widths["cross"], name="real")
    with torch.no_grad():  # the A1111 N(0, 0.01) init is nearly the identity; make the effect visible
        for p in hn.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(17)) * 0.2)
    hn.eval()
    keys = list(unet.state_dict())
    bare = run(unet, inputs)
    with hypernetworks_attached(unet, [hn]):
        assert list(unet.state_dict()) == keys
        torch.testing.assert_close(run(unet, inputs), bare, rtol=0, atol=1e-5)  # eval, multiplier 0

        hn.multiplier = 0.5
        attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
        gen = torch.Generator().manual_seed(18)
        x, ctx = torch.randn(2, 16, 32, generator=gen), torch.randn(2, 7, CROSS_WIDTH, generator=gen)
        k_mlp, v_mlp = (module.linear for module in hn.pairs[str(CROSS_WIDTH)])
        expected = hand_attention(attn, x, ctx + k_mlp(ctx) * 0.5, ctx + v_mlp(ctx) * 0.5)
        torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), expected, rtol=1e-5, atol=1e-5)

        hn.train()  # A1111 trains at strength 1 whatever the multiplier
        expected = hand_attention(attn, x, ctx + k_mlp(ctx), ctx + v_mlp(ctx))
        torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), expected, rtol=1e-5, atol=1e-5)
        run(unet, inputs).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hn.parameters())
    assert all(p.grad is None for p in unet.parameters())
