"""The VAE task's sampled latents, checked through a training step: z ~ N(mean, exp(0.5 * logvar)^2)."""

from __future__ import annotations

import math

import pytest
import torch

from hyperlit.tasks import TASKS


class Decoded(Exception):
    """Stops the training step once the decoder input is known."""


def drawn_latents(module, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The latents one training step hands to the decoder, for a posterior fixed to (mean, logvar)."""
    seen: list[torch.Tensor] = []

    def decode(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.detach().clone())
        raise Decoded

    module.posterior = lambda pixels, index=None: (mean, logvar)
    module.decode = decode
    module._opts = lambda: (None, None)
    with pytest.raises(Decoded):
        module.training_step({"pixels": torch.zeros(mean.shape[0], 3, 8, 8)}, 0)
    return seen[0]


def test_sampled_latents_have_the_standard_deviation_of_the_posterior(vae_cfg):
    module = TASKS["vae"](vae_cfg("posterior.sample=true", "posterior.cache=false")).load_module()
    torch.manual_seed(0)
    logvar_value = 1.4  # std exp(0.7) ~ 2.01; the variance exp(1.4) ~ 4.06 and exp(logvar/4) ~ 1.42 are far off
    mean = torch.full((4, 4, 64, 64), 0.75)
    logvar = torch.full_like(mean, logvar_value)
    z = drawn_latents(module, mean, logvar)
    # 65536 draws: the sample std's relative standard error is ~ 1/sqrt(2n) ~ 0.3 %, so 3 % is far outside chance
    assert z.std().item() == pytest.approx(math.exp(0.5 * logvar_value), rel=0.03)
    assert z.mean().item() == pytest.approx(0.75, abs=0.05)
    # per-element std: a posterior with two logvars gives two spreads
    logvar2 = torch.cat([torch.full((2, 4, 64, 64), -2.0), torch.full((2, 4, 64, 64), 1.0)])
    z2 = drawn_latents(module, torch.zeros_like(logvar2), logvar2)
    assert z2[:2].std().item() == pytest.approx(math.exp(-1.0), rel=0.03)
    assert z2[2:].std().item() == pytest.approx(math.exp(0.5), rel=0.03)


def test_the_posterior_mode_is_used_when_sampling_is_off(vae_cfg):
    module = TASKS["vae"](vae_cfg("posterior.sample=false", "posterior.cache=false")).load_module()
    mean = torch.randn(2, 4, 8, 8)
    z = drawn_latents(module, mean, torch.full_like(mean, 1.4))
    assert torch.equal(z, mean)
