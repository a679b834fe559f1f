"""The diffusion objective of the hypernetwork task against a hand computation."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from helpers.audit_oracles import sd1_context

from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
from hyperlit.tasks.hypernetwork.build import check_timestep_range
from hyperlit.tasks.hypernetwork.module import HypernetworkTask, min_snr_weights


def _task(components, **kwargs) -> HypernetworkTask:
    hn = Hypernetwork(HypernetworkConfig(), sizes=[48, 32, 64])
    return HypernetworkTask(hn, components, functools.partial(torch.optim.AdamW), **kwargs)


def _batch(components, weight: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=g), "context": torch.randn(2, 77, 48, generator=g)}
    if weight:
        batch["weight"] = torch.rand(2, 4, 8, 8, generator=g) * 2
    return batch


def _hand_loss(components, batch, seed, prediction_type="epsilon", offset=0.0, gamma=None, timesteps=(0, 1000)):
    g = torch.Generator().manual_seed(seed)
    x0 = batch["latents"]
    noise = torch.randn(x0.shape, generator=g)
    if offset:
        noise = noise + offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=g)
    t = torch.randint(*timesteps, (x0.shape[0],), generator=g)
    alpha_bar = components.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    with torch.no_grad():
        prediction = components.unet(noisy, t, batch["context"]).sample
    error = (prediction - target) ** 2
    if "weight" in batch:
        error = error * batch["weight"]
    per_sample = error.mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (alpha_bar / (1 - alpha_bar)).view(-1)
        factor = torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        per_sample = per_sample * factor
    return per_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("offset", "gamma", "weight", "timesteps"),
    [(0.0, None, False, (0, None)), (0.1, 5.0, True, (0, None)), (0.0, None, False, (100, 400))],
)
def test_loss_matches_the_hand_computation(tiny_components, prediction_type, offset, gamma, weight, timesteps):
    low, high = timesteps
    task = _task(
        tiny_components, prediction_type=prediction_type, noise_offset=offset, min_snr_gamma=gamma,
        min_timestep=low, max_timestep=high,
    )  # fmt: skip
    batch = _batch(tiny_components, weight=weight)
    with torch.no_grad():
        ours = task.compute_loss(batch, generator=torch.Generator().manual_seed(7))
    expected = _hand_loss(tiny_components, batch, 7, prediction_type, offset, gamma, (low, high or 1000))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("low", "high"), [(0, None), (0, 500), (250, 750), (999, None)])
def test_timesteps_are_drawn_uniformly_from_the_configured_range(tiny_components, monkeypatch, low, high):
    task = _task(tiny_components, min_timestep=low, max_timestep=high)
    drawn = []
    monkeypatch.setattr(task, "loss_at", lambda latents, noise, t, cond, weight: drawn.append(t) or t.float())
    generator = torch.Generator().manual_seed(3)
    batch = {"latents": torch.zeros(64, 4, 8, 8), "context": torch.zeros(64, 77, 48)}
    for _ in range(16):
        task.compute_loss(batch, generator=generator)
    t = torch.cat(drawn)
    top = 1000 if high is None else high
    assert int(t.min()) >= low and int(t.max()) < top
    # 1024 draws: both ends of the range are reached (within 5 % of its width) and the mean sits in its middle
    width = top - low
    assert int(t.min()) <= low + 0.05 * width and int(t.max()) >= top - 1 - 0.05 * width
    assert abs(t.float().mean().item() - (low + top - 1) / 2) <= 0.05 * width + 0.5


def test_min_snr_weights_formula():
    alphas = torch.tensor([0.99, 0.5, 0.01])
    t = torch.tensor([0, 1, 2])
    snr = alphas / (1 - alphas)  # 99, 1, 1/99
    eps = min_snr_weights(alphas, t, 5.0, "epsilon")
    v = min_snr_weights(alphas, t, 5.0, "v_prediction")
    torch.testing.assert_close(eps, torch.tensor([5 / 99, 1.0, 1.0]))
    torch.testing.assert_close(v, torch.stack([5 / (snr[0] + 1), snr[1] / (snr[1] + 1), snr[2] / (snr[2] + 1)]))


def test_captions_are_encoded_when_no_context_is_cached(tiny_components):
    task = _task(tiny_components)
    batch = {"latents": torch.randn(2, 4, 8, 8), "caption": ["a red circle", "a blue square"]}
    expected = sd1_context(tiny_components.tokenizer, tiny_components.text_encoder, batch["caption"])  # independent
    torch.testing.assert_close(task.context_for(batch), expected)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prediction_type": "sample"}, "train.prediction_type"),
        ({"min_snr_gamma": 0.0}, "train.min_snr_gamma"),
        ({"noise_offset": -0.1}, "train.noise_offset"),
        ({"min_timestep": -1}, "train.min_timestep"),
        ({"min_timestep": 500, "max_timestep": 500}, "train.min_timestep: 500, train.max_timestep: 500"),
    ],
)
def test_invalid_objective_options_name_the_key(tiny_components, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        _task(tiny_components, **kwargs)


@pytest.mark.parametrize(
    ("low", "high", "schedule", "fragment"),
    [
        (0, 1001, 1000, "train.max_timestep: 1001 is not allowed; use at most 1000"),
        (1000, None, 1000, "train.min_timestep: 1000 is not allowed; use less than 1000"),
        (0, 600, 500, "train.max_timestep: 600"),
        (True, None, None, "train.min_timestep: True"),
        (0, "500", None, "train.max_timestep: '500'"),
    ],
)
def test_timestep_range_is_checked_against_the_schedule(low, high, schedule, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        check_timestep_range(low, high, schedule)
    check_timestep_range(0, schedule, schedule)  # the whole schedule is allowed
