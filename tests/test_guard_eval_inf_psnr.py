"""`eval-vae` with an infinite PSNR (one exact reconstruction): the model's PSNR is the mean over its finite
per-image values (hyperlit/vae/evaluate.py), so it stays a number and `--fail-if-worse` can still fail it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hyperlit.cli import main
from hyperlit.vae import load as vae_load

RES = 16


class ShiftingVAE(torch.nn.Module):
    """Stand-in VAE: latents are the pixels; the decoder adds `levels` (8-bit steps) to every image that is not
    flat, and returns flat images exactly."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels
        self.unused = torch.nn.Parameter(torch.zeros(1))  # reconstruct() reads the dtype off a parameter

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        textured = (z.flatten(1).std(1) > 0).float().view(-1, 1, 1, 1)
        return SimpleNamespace(sample=z + textured * self.levels / 127.5)


def psnr_of_a_shift(levels: int) -> float:
    """Every pixel off by `levels` of 255: MSE = (levels / 255)^2 on [0, 1], whatever the image."""
    return 20 * math.log10(255 / levels)


def write_images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(np.full((RES, RES, 3), 128, dtype=np.uint8)).save(folder / "0_flat.png")
    for i in range(1, 4):  # values in [40, 190]: a shift of up to 40 levels never clips
        Image.fromarray(rng.integers(40, 191, (RES, RES, 3), dtype=np.uint8)).save(folder / f"{i}_noise.png")
    return folder


def test_one_exact_reconstruction_keeps_the_psnr_finite_and_fail_if_worse_working(tmp_path, monkeypatch, capsys):
    data = write_images(tmp_path / "data")
    stand_ins = {"exact_on_one": ShiftingVAE(20), "reference": ShiftingVAE(4)}
    for name in stand_ins:
        (tmp_path / name).mkdir()
    monkeypatch.setattr(vae_load, "load_vae", lambda path, **kwargs: stand_ins[Path(path).name])
    one, ref = str(tmp_path / "exact_on_one"), str(tmp_path / "reference")
    args = ["eval-vae", "--data", str(data), "--resolution", str(RES), "--model-path", one, "--model-path", ref]
    code = main([*args, "--json", "--fail-if-worse", ref])
    report = json.loads(capsys.readouterr().out)
    by_label = {m["label"]: m for m in report["models"]}
    # the exact image (inf dB) ranks best, the three shifted ones are its worst
    assert sorted(by_label[one]["worst"]) == ["1_noise.png", "2_noise.png", "3_noise.png"]
    # the average is over the three finite images: 22.1 dB, not inf
    assert by_label[one]["psnr"] == pytest.approx(psnr_of_a_shift(20), abs=1e-3)
    assert by_label[ref]["psnr"] == pytest.approx(psnr_of_a_shift(4), abs=1e-3)
    assert code == 1 and len(report["fail_if_worse"]["failures"]) == 1
    assert report["fail_if_worse"]["failures"][0].startswith(f"{one}: PSNR 22.11 < ")
    # the other way round nothing is worse: the model with the exact image is the reference
    assert main([*args, "--fail-if-worse", one]) == 0
