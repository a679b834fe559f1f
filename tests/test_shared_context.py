"""The text context's K/V inputs are computed once per UNet forward and equal the per-layer computation.

Per-layer mode (`share_text_context=False`, what A1111 does) is the reference everywhere: each test runs the
same thing both ways and compares bit for bit, and counts the hypernetwork calls to prove sharing happened.
"""

from __future__ import annotations

import pytest
import torch
from helpers.attention_models import (
    CROSS_LAYERS,
    CROSS_WIDTH,
    CrossCalls,
    ToyHypernetwork,
    inputs,
    make_unet,
    real_hypernetwork,
)
from torch import Tensor, nn

from hyperlit.attention import attach_hypernetworks, detach_hypernetworks, hypernetworks_attached, sharing_text_context
from hyperlit.hypernetwork import Hypernetwork
from hyperlit.kv_inputs import apply_hypernetworks, share_context_kv, shareable


@pytest.fixture(scope="module")
def unet():
    return make_unet()


def forward(unet: nn.Module, hns: list, share: bool, batch: dict[str, Tensor], seed: int = 0) -> Tensor:
    torch.manual_seed(seed)  # dropout masks, when any, are drawn from the global RNG
    with hypernetworks_attached(unet, hns, share_text_context=share):
        assert sharing_text_context(unet) == share
        return unet(**batch).sample


def both_ways(unet, hns, batch, seed=0) -> tuple[Tensor, Tensor, int, int]:
    """(shared output, per-layer output, cross calls when shared, cross calls per layer)."""
    counter = CrossCalls(*[hn for hn in hns if isinstance(hn, Hypernetwork)])
    try:
        shared = forward(unet, hns, True, batch, seed)
        shared_calls, counter.count = counter.count, 0
        per_layer = forward(unet, hns, False, batch, seed)
        return shared, per_layer, shared_calls, counter.count
    finally:
        counter.remove()


def grads(hn: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in hn.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_bitwise_and_gradients_equal_per_layer(dtype):
    unet = make_unet().to(dtype)
    hn = real_hypernetwork().to(dtype).train()
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs().items()}
    results = {}
    for share in (True, False):
        hn.zero_grad(set_to_none=True)
        counter = CrossCalls(hn)
        out = forward(unet, [hn], share, batch)
        out.pow(2).mean().backward()
        counter.remove()
        results[share] = out.detach(), grads(hn), counter.count
    (out_s, grad_s, calls_s), (out_p, grad_p, calls_p) = results[True], results[False]
    assert (calls_s, calls_p) == (1, CROSS_LAYERS)
    assert torch.equal(out_s, out_p)
    cross = [name for name in grad_p if name.startswith(f"pairs.{CROSS_WIDTH}.")]
    scale = max(grad_p[name].abs().max() for name in cross)
    for name in grad_s:
        assert grad_s[name].abs().max() > 0, name
        if name in cross:
            # One backward through the network with the layers' gradients summed first, instead of one backward
            # per layer summed afterwards: the same sum in another order, so equal up to rounding, not bitwise.
            # (The K path's last bias gets ~0 gradient: softmax ignores a shift shared by all keys.)
            tol = 1e-5 if dtype == torch.float32 else 1e-13
            torch.testing.assert_close(grad_s[name], grad_p[name], rtol=tol, atol=tol * scale)
        else:
            assert torch.equal(grad_s[name], grad_p[name]), name  # self-attention widths are computed per layer


def test_a_new_context_is_never_served_from_a_previous_forward(unet):
    hn = real_hypernetwork(seed=1).eval()
    for seed in (2, 3):
        shared, per_layer, calls, _ = both_ways(unet, [hn], inputs(seed))
        assert torch.equal(shared, per_layer) and calls == 1
    first, second = inputs(2), inputs(3)
    assert not torch.allclose(forward(unet, [hn], True, first), forward(unet, [hn], True, second), atol=1e-3)


def test_same_tensor_reused_while_weights_or_values_change_between_forwards(unet):
    """Previews reuse one prompt tensor for many forwards while training changes the weights in between."""
    hn = real_hypernetwork(seed=4).eval()
    batch = inputs(4)
    context = batch["encoder_hidden_states"]
    outputs, expected = [], []

    def per_layer() -> None:
        with torch.no_grad():
            expected.append(forward(unet, [hn], False, batch))

    with hypernetworks_attached(unet, [hn]), torch.no_grad():  # one attach for all forwards, like a trainer
        outputs.append(unet(**batch).sample)
        for p in hn.parameters():
            p.mul_(0.5)  # an optimizer step between two previews
        outputs.append(unet(**batch).sample)
        context.mul_(2.0)  # same object, new values (its version counter moves)
        outputs.append(unet(**batch).sample)
    for p in hn.parameters():
        p.data.mul_(2.0)
    context.mul_(0.5)  # powers of two: exact
    per_layer()
    for p in hn.parameters():
        p.data.mul_(0.5)
    per_layer()
    context.mul_(2.0)
    per_layer()
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4) and not torch.allclose(
        outputs[1], outputs[2], atol=1e-4
    )


@pytest.mark.parametrize("multiplier", [0.0, 0.35, -1.0])
def test_multiplier_changes_between_forwards(unet, multiplier):
    hn = real_hypernetwork(seed=5, multiplier=0.8).eval()
    batch = inputs(5)
    with hypernetworks_attached(unet, [hn]):
        unet(**batch)
        hn.multiplier = multiplier
        shared = unet(**batch).sample
    per_layer = forward(unet, [hn], False, batch)
    assert torch.equal(shared, per_layer)
    hn.multiplier = 0.8
    assert not torch.allclose(shared, forward(unet, [hn], False, batch), atol=1e-4)


def test_dropout_in_training_is_never_shared_and_matches_per_layer_draws(unet):
    # Each layer draws its own dropout mask in A1111; one shared mask would be a different model.
    hn = real_hypernetwork(seed=6, dropout=[0.0, 0.3, 0.0]).train()
    batch = inputs(6)
    assert not shareable([hn])
    shared, per_layer, calls, calls_per_layer = both_ways(unet, [hn], batch, seed=7)
    assert calls == calls_per_layer == CROSS_LAYERS
    assert torch.equal(shared, per_layer)
    # dropout is really active: another seed draws other masks
    assert not torch.allclose(shared, forward(unet, [hn], True, batch, seed=8), atol=1e-4)

    hn.eval()  # inference: deterministic, shared again
    shared, per_layer, calls, _ = both_ways(unet, [hn], batch)
    assert calls == 1 and torch.equal(shared, per_layer)


def test_input_noise_in_training_is_never_shared_and_matches_per_layer_draws(unet):
    # hypernet.input_noise draws per call, as dropout does: one draw shared by every layer would be another model
    hn = real_hypernetwork(seed=6, input_noise=0.5).train()
    batch = inputs(6)
    assert not shareable([hn])
    shared, per_layer, calls, calls_per_layer = both_ways(unet, [hn], batch, seed=7)
    assert calls == calls_per_layer == CROSS_LAYERS
    assert torch.equal(shared, per_layer)
    assert not torch.allclose(shared, forward(unet, [hn], True, batch, seed=8), atol=1e-4)  # the noise is drawn
    hn.eval()  # inference never adds noise: shared again
    shared, per_layer, calls, _ = both_ways(unet, [hn], batch)
    assert calls == 1 and torch.equal(shared, per_layer)


def test_train_then_eval_of_the_same_network(unet):
    hn = real_hypernetwork(seed=9, multiplier=0.4)
    batch = inputs(9)
    outputs = {}
    for mode in ("train", "eval", "train"):
        getattr(hn, mode)()
        shared, per_layer, calls, _ = both_ways(unet, [hn], batch)
        assert calls == 1 and torch.equal(shared, per_layer)
        outputs.setdefault(mode, shared)
    assert not torch.allclose(outputs["train"], outputs["eval"], atol=1e-4)  # strength 1 vs 0.4


def test_stacked_networks(unet):
    hn1, hn2 = real_hypernetwork(seed=10), real_hypernetwork(seed=11, multiplier=0.6)
    hn1.eval(), hn2.eval()
    batch = inputs(10)
    counter = CrossCalls(hn1, hn2)
    shared = forward(unet, [hn1, hn2], True, batch)
    # once per forward, not per layer; apply_hypernetworks calls a later network on the K and the V input
    # separately, hence 1 + 2 calls of the K modules
    assert counter.count == 3
    counter.remove()
    assert torch.equal(shared, forward(unet, [hn1, hn2], False, batch))
    assert not torch.allclose(shared, forward(unet, [hn2, hn1], True, batch), atol=1e-4)  # order matters
    # non-Module networks cannot be inspected for randomness: computed per layer
    toy = ToyHypernetwork([CROSS_WIDTH], seed=12)
    assert shareable([toy]) and not shareable([hn1, object()])


def test_a_preview_under_no_grad_inside_a_training_step_leaves_gradients_exact(unet):
    hn = real_hypernetwork(seed=13).train()
    batch, preview = inputs(13), inputs(14, batch=1)

    def step(with_preview: bool) -> dict[str, Tensor]:
        hn.zero_grad(set_to_none=True)
        hn.train()
        with hypernetworks_attached(unet, [hn]):
            loss = unet(**batch).sample.pow(2).mean()
            if with_preview:
                hn.eval()
                with torch.no_grad():
                    for _ in range(2):  # a denoising loop reusing one prompt tensor
                        unet(**preview)
                hn.train()
            loss.backward()
        return grads(hn)

    plain, previewed = step(False), step(True)
    assert all(torch.equal(plain[n], previewed[n]) for n in plain)


def test_serves_checks_tensor_networks_and_state():
    hn = ToyHypernetwork([CROSS_WIDTH], seed=15).eval()
    hns = (hn,)
    ctx = torch.randn(1, 3, CROSS_WIDTH)
    shared = share_context_kv(hns, ctx)
    assert shared is not None and shared.serves(ctx, hns)
    k, v = apply_hypernetworks(hns, ctx)
    assert torch.equal(shared.k, k) and torch.equal(shared.v, v)
    assert not shared.serves(ctx.clone(), hns)  # equal values, other tensor
    assert shared.serves(ctx, (hn,))  # the same networks attached again
    assert not shared.serves(ctx, (ToyHypernetwork([CROSS_WIDTH], seed=15).eval(),))  # equal weights, other net
    assert not shared.serves(ctx, (hn, hn))
    hn.multiplier = 0.5
    assert not shared.serves(ctx, hns)
    hn.multiplier = 1.0
    hn.train()
    assert not shared.serves(ctx, hns)
    hn.eval()
    with torch.no_grad():
        assert not shared.serves(ctx, hns)
    ctx.add_(1)
    assert not shared.serves(ctx, hns)
    assert share_context_kv(hns, torch.randn(1, 3, 5)) is None  # no module for that width: nothing to share
    assert share_context_kv((), ctx) is None


def test_detach_and_per_layer_attach_remove_the_hook(unet):
    hn = ToyHypernetwork([CROSS_WIDTH], seed=16)
    attach_hypernetworks(unet, [hn])
    assert sharing_text_context(unet)
    attach_hypernetworks(unet, [hn], share_text_context=False)
    assert not sharing_text_context(unet)
    attach_hypernetworks(unet, [hn])
    with hypernetworks_attached(unet, [hn], share_text_context=False):
        assert not sharing_text_context(unet)
    assert sharing_text_context(unet)
    detach_hypernetworks(unet)
    assert not sharing_text_context(unet) and not unet._forward_pre_hooks


def test_positional_arguments_and_existing_cross_attention_kwargs(unet):
    hn = real_hypernetwork(seed=17).eval()
    batch = inputs(17)
    counter = CrossCalls(hn)
    with hypernetworks_attached(unet, [hn]):
        positional = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"]).sample
        calls_positional, counter.count = counter.count, 0
        with_kwargs = unet(**batch, cross_attention_kwargs={}).sample
    counter.remove()
    assert calls_positional == 1 and counter.count == 1
    expected = forward(unet, [hn], False, batch)
    assert torch.equal(positional, expected) and torch.equal(with_kwargs, expected)


def test_shared_text_gradients_are_as_close_to_exact_as_the_per_layer_ones():
    """The fp32 gradient difference between sharing and per-layer is rounding, not a missing or extra term.

    Bitwise equality of the text-context network's gradients cannot hold once its backward runs once: per layer,
    autograd sums the layers' *weight* gradients (sum_l g_l^T h); shared, it sums the layers' *output* gradients
    first ((sum_l g_l)^T h), and fp32 addition is not associative. The oracle is the same computation in fp64:
    the shared fp32 gradients must be as close to it as A1111's per-layer fp32 gradients are.
    """
    batch32 = inputs()
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch32.items()}
    results = {}
    for name, dtype, share in (("shared", torch.float32, True), ("per_layer", torch.float32, False),
                               ("exact", torch.float64, False)):  # fmt: skip
        unet, hn = make_unet().to(dtype), real_hypernetwork().to(dtype).train()
        forward(unet, [hn], share, batch64 if dtype == torch.float64 else batch32).pow(2).mean().backward()
        results[name] = {n: g.double() for n, g in grads(hn).items() if n.startswith(f"pairs.{CROSS_WIDTH}.")}
    exact = results["exact"]
    scale = max(g.abs().max().item() for g in exact.values())
    for name, g in exact.items():
        shared_error = (results["shared"][name] - g).abs().max().item()
        per_layer_error = (results["per_layer"][name] - g).abs().max().item()
        # both are fp32 rounding (relative ~1e-7 of the largest gradient); sharing must not be worse by more
        # than a small factor (a dropped layer or a doubled term would be off by ~1/7 of the gradient)
        assert shared_error <= 4 * per_layer_error + 1e-6 * scale, (name, shared_error, per_layer_error, scale)
