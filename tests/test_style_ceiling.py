"""benchmarks/style_ceiling.py: each mode trains exactly the part of the UNet it names, and nothing else moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention
from helpers.scripts import load_script

from hyperlit.demo.quality import load_pipeline
from hyperlit.demo.styles import style_named, write_style_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ceiling():
    return load_script(REPO / "benchmarks" / "style_ceiling.py")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def attention_weights(unet: torch.nn.Module) -> dict[str, set[int]]:
    """Ids of the parameters of every attention module, and of their K / V projections, found by module type."""
    every, kv = set(), set()
    for module in unet.modules():
        if isinstance(module, Attention):
            every |= {id(p) for p in module.parameters()}
            kv |= {id(p) for p in (*module.to_k.parameters(), *module.to_v.parameters())}
    return {"attn": every, "kv": kv}


def test_modes_pick_the_parts_they_name_and_freeze_the_rest(ceiling, pipe):
    unet = pipe.unet
    by_type = attention_weights(unet)
    everything = {id(p) for p in unet.parameters()}
    picked = {}
    for mode in ceiling.MODES:
        chosen = {id(p) for p in ceiling.trainable(unet, mode)}
        assert chosen == {id(p) for p in unet.parameters() if p.requires_grad}, mode
        picked[mode] = chosen
    assert picked["full"] == everything
    assert picked["kv"] == by_type["kv"] and picked["kv"]
    assert picked["attn"] == by_type["attn"] and picked["kv"] < picked["attn"]
    assert picked["rest"] == everything - by_type["attn"]
    for p in unet.parameters():
        p.requires_grad_(False)


def test_a_kv_fine_tune_moves_only_keys_and_values_and_leaves_the_base_alone(ceiling, pipe, tmp_path):
    write_style_set(style_named("halftone_dots"), tmp_path, count=2)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    unet, count, loss = ceiling.fine_tune(
        pipe, ceiling.encode(pipe, tmp_path), "kv", lr=1e-2, steps=3, batch=2, min_timestep=0, seed=0
    )
    assert unet is not pipe.unet and loss > 0
    assert count == sum(p.numel() for n, p in pipe.unet.named_parameters() if ".to_k." in n or ".to_v." in n)
    moved = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".to_k." in n or ".to_v." in n for n in moved), sorted(moved)[:5]
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


def test_lr_count_must_match_the_modes(ceiling, capsys):
    with pytest.raises(SystemExit) as stop:
        ceiling.main(["--modes", "full", "kv", "attn", "--lr", "1e-4", "1e-3"])
    assert stop.value.code == 2
    assert "--lr takes 1 or 3 values (one per mode), got 2" in capsys.readouterr().err
