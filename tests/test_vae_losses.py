"""Discriminator, LPIPS and loss formulas of the VAE-decoder task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.vae_reference import adaptive_weight

from hyperlit.options import build_options
from hyperlit.vae.config import DiscConfig, VAETaskConfig
from hyperlit.vae.discriminator import PatchDiscriminator
from hyperlit.vae.losses import (
    adversarial_factor,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)
from hyperlit.vae.lpips import LPIPS, TAP_CHANNELS, TAPS, bundled_lin_weights, vgg16_features


def test_patchgan_matches_reference_size_and_patch_grid():
    d = PatchDiscriminator()
    assert sum(p.numel() for p in d.parameters()) == 2_765_633  # taming's NLayerDiscriminator, n_layers=3, ndf=64
    with torch.no_grad():
        out = d.eval()(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 1, 30, 30)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002


def test_patchgan_rejects_unknown_norm():
    with pytest.raises(ValueError, match="disc.norm='layer'.*batch, group, none"):
        PatchDiscriminator(norm="layer")


def test_adaptive_weight_matches_hand_computation():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    a = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # d rec / dW, norm 5
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # d gan / dW, norm sqrt(2)
    rec = (w * a).sum() + 7.0
    gan = (w * b).sum() ** 1  # linear: gradient is b
    weight, n_rec, n_gan = adaptive_weight(rec, gan, w)
    assert n_rec.item() == pytest.approx(5.0)
    assert n_gan.item() == pytest.approx(math.sqrt(2))
    assert weight.item() == pytest.approx(5.0 / (math.sqrt(2) + 1e-4), rel=1e-6)
    assert weight.dtype == torch.float32 and not weight.requires_grad
    # clamp: a vanishing GAN gradient gives rec_norm / 1e-4 = 5e4, clamped to max_weight
    weight, _, _ = adaptive_weight(rec, (w * 0).sum(), w, max_weight=1e4)
    assert weight.item() == 1e4
    # the graph survives for the caller's backward
    (rec + weight * gan).backward()
    assert torch.allclose(w.grad, a + weight * b)


def test_gan_losses_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    hinge = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(hinge)
    ns = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(ns.item())
    assert generator_loss(fake, "hinge").item() == pytest.approx(-fake.mean().item())
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(F.softplus(-fake).mean().item())
    with pytest.raises(ValueError, match="disc.loss='lsgan'"):
        generator_loss(fake, "lsgan")


def test_reconstruction_losses():
    x = torch.zeros(1, 3, 2, 2)
    y = torch.full((1, 3, 2, 2), 0.5)
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(x, y, "mse").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="loss.reconstruction='l3'"):
        reconstruction_loss(x, y, "l3")


def test_adversarial_factor_warmup_and_ramps():
    # D starts at 10, G waits 5 more steps, then ramps over 4 steps
    f = [adversarial_factor(s, 10, 5, 4) for s in range(13, 21)]
    assert f == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert adversarial_factor(15, 10, 5, 0) == 1.0
    assert adversarial_factor(16, 10, 5, 4, "cosine") == pytest.approx(0.5)


def test_config_from_mapping_validates_keys_and_values():
    cfg = build_options(VAETaskConfig, {"disc": {"start": 3}, "loss": {"perceptual": {"weight": 0.1}}})
    assert cfg.disc.start == 3 and cfg.loss.perceptual.weight == 0.1
    with pytest.raises(ValueError, match="disc.strat: 'strat' is not allowed; allowed keys: adaptive, "):
        build_options(VAETaskConfig, {"disc": {"strat": 3}})
    with pytest.raises(ValueError, match="disc.loss: 'wgan' is not allowed; allowed: hinge, non_saturating"):
        DiscConfig(loss="wgan")


# ---------------------------------------------------------------- LPIPS


def _torchvision_layout_vgg(path, seed=0):
    torch.manual_seed(seed)
    feats = vgg16_features()
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision state dicts carry the classifier too
    torch.save(sd, path)
    return feats


def test_lpips_requires_weights_unless_flagged(tmp_path):
    with pytest.raises(ValueError, match="loss.perceptual.weights is not set"):
        LPIPS()
    with pytest.raises(FileNotFoundError, match="loss.perceptual.weights='.*nope.pth'"):
        LPIPS(weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="missing features.0.bias"):
        LPIPS(weights=bad)


def test_lpips_loads_torchvision_layout_and_matches_reference(tmp_path):
    path = tmp_path / "vgg16.pth"
    feats = _torchvision_layout_vgg(path)
    lp = LPIPS(weights=path)
    assert all(torch.equal(a, b) for a, b in zip(lp.features.parameters(), feats.parameters(), strict=True))
    if bundled_lin_weights() is not None:
        heads = torch.load(bundled_lin_weights(), map_location="cpu", weights_only=True)
        assert torch.equal(lp.heads[2].weight, heads["lin2.model.1.weight"])
    else:
        heads = {f"lin{i}.model.1.weight": h.weight for i, h in enumerate(lp.heads)}

    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    # independent reference: the published LPIPS formula, layer by layer
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    a, b = (x - shift) / scale, (y - shift) / scale
    ref = torch.zeros(2)
    k = 0
    with torch.no_grad():
        for i, layer in enumerate(feats):
            a, b = layer(a), layer(b)
            if i in TAPS:
                na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                w = heads[f"lin{k}.model.1.weight"].view(1, TAP_CHANNELS[k], 1, 1)
                ref += ((na - nb) ** 2 * w).sum(1).mean((1, 2))
                k += 1
            if i == TAPS[-1]:
                break
        got = lp(x, y)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert torch.allclose(lp(x, x), torch.zeros(2), atol=1e-7)


def test_lpips_is_frozen_but_passes_gradient_to_images():
    torch.manual_seed(0)
    lp = LPIPS(random_backbone=True)
    lp.train()
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    d = lp(x, torch.rand(1, 3, 16, 16)).sum()
    d.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
