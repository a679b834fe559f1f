"""`eval-vae` scores tiny autoencoders from hyperlit's exported files without extra flags: the diffusers
AutoencoderTiny folder, the madebyollin pair (either file, .safetensors or .pth) and a decoder alone (fed by the
full VAE listed with it); figures against diffusers' AutoencoderTiny run here and PSNR computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from helpers.taesd import textured_taesd
from helpers.vae import SAMPLE

from hyperlit.cli import main
from hyperlit.models.loader import embedded_tiny_vae
from hyperlit.vae.evaluate import load_eval_images
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.taesd_layout import save_taesd_files
from hyperlit.vae.taesd_read import TRAINED_PARTS

RES, LIMIT = 32, 3
SCALING, SHIFT = 0.5, 0.1  # what the decoder-alone file says its teacher's latents were scaled by


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("taesd_files")
    model = textured_taesd(0)
    save_taesd_files(model, root, "taesd")
    save_diffusers_folder(model, root / "diffusers")
    meta = {"hyperlit.source_scaling_factor": str(SCALING), "hyperlit.source_shift_factor": str(SHIFT)}
    save_taesd_files(model, root / "alone", "taesd", ("decoder",), metadata=meta)
    # what a taesd.train_encoder=false run writes: both halves, the metadata naming the one that trained
    save_diffusers_folder(model, root / "alone" / "diffusers", metadata={**meta, TRAINED_PARTS: "decoder"})
    pixels = load_eval_images(SAMPLE, RES, LIMIT).pixels  # the protocol's crop is tested in test_vae_eval
    return {"root": root, "model": model, "pixels": pixels}


def hand_psnr(x: torch.Tensor, decoded: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE) on [0, 1], the decode rounded to 8 bits first (numpy, float64)."""
    target = x.numpy().astype(np.float64) / 255
    out = np.round((np.clip(decoded.numpy().astype(np.float64), -1, 1) + 1) * 127.5) / 255
    mse = ((out - target) ** 2).reshape(len(target), -1).mean(1)
    return float(np.mean(10 * np.log10(1 / mse)))


def scores(capsys, *argv: str) -> tuple[int, dict[str, dict]]:
    code = main(["eval-vae", "--data", str(SAMPLE), "--resolution", str(RES), "--limit", str(LIMIT), "--json", *argv])
    out = capsys.readouterr().out
    return code, {row["label"]: row for row in json.loads(out)["models"]} if out else {}


def test_each_layout_scores_as_diffusers_autoencodertiny_computed_by_hand(files, capsys) -> None:
    root = files["root"]
    reference = AutoencoderTiny.from_pretrained(root / "diffusers").eval()
    x = files["pixels"]
    with torch.no_grad():
        decoded = reference.decode(reference.encode(x.float() / 127.5 - 1).latents).sample
    expected = hand_psnr(x, decoded)
    assert 8 < expected < 30  # the images vary: a trivial all-black decode would not test much
    paths = [root / "diffusers", root / "taesd_decoder.safetensors", root / "taesd_encoder.pth"]
    code, rows = scores(capsys, *[a for p in paths for a in ("--model-path", str(p))])
    assert code == 0 and list(rows) == [str(p) for p in paths]
    for row in rows.values():
        assert row["psnr"] == pytest.approx(expected, abs=1e-4)
        assert 0 < row["ssim"] < 1
    assert "AutoencoderTiny folder" in rows[str(paths[0])]["source"]
    assert "taesd_encoder.safetensors" in rows[str(paths[1])]["source"]  # the partner file brought along


@pytest.mark.parametrize("name", ["taesd_decoder.safetensors", "diffusers"])
def test_a_decoder_alone_decodes_the_full_vaes_latents_in_the_files_scale(name, files, capsys) -> None:
    alone = files["root"] / "alone" / name
    x, model = files["pixels"], files["model"]
    teacher = embedded_tiny_vae()
    with torch.no_grad():
        z = teacher.encode(x.float() / 127.5 - 1).latent_dist.mode()
        decoded = model.decode((z - SHIFT) * SCALING).sample
    code, rows = scores(capsys, "--model", "tiny", "--model-path", str(alone))
    assert code == 0
    assert rows[str(alone)]["psnr"] == pytest.approx(hand_psnr(x, decoded), abs=1e-4)
    assert "decoder" in rows[str(alone)]["source"] and "latents from tiny" in rows[str(alone)]["source"]


def test_fail_if_worse_between_a_taesd_and_a_full_vae(files, capsys) -> None:
    folder = str(files["root"] / "diffusers")
    code, rows = scores(capsys, "--model-path", folder, "--fail-if-worse", "tiny")
    assert set(rows) == {folder, "tiny"} and rows["tiny"]["psnr"] > rows[folder]["psnr"] + 1
    assert code == 1  # the random TAESD is worse than the tiny base's VAE
    code, rows = scores(capsys, "--model", "tiny", "--fail-if-worse", folder)
    assert code == 0 and set(rows) == {folder, "tiny"}


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("encoder_alone", "a TAESD encoder alone"),
        ("decoder_without_vae", "a TAESD decoder alone needs latents"),
        ("fp16", "--fp16"),
        ("wrong_partner", "is not a TAESD encoder"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(case, needle, files, tmp_path, capsys, monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr("hyperlit.vae.taesd_eval.load_taesd", refuse)
    monkeypatch.setattr("hyperlit.vae.load.load_vae", refuse)
    monkeypatch.setattr("hyperlit.models.loader.embedded_tiny_vae", refuse)
    root = files["root"]
    if case == "encoder_alone":
        (tmp_path / "x_encoder.pth").write_bytes((root / "taesd_encoder.pth").read_bytes())
        argv = ["--model", "tiny", "--model-path", str(tmp_path / "x_encoder.pth")]
    elif case == "decoder_without_vae":
        argv = ["--model-path", str(root / "alone" / "taesd_decoder.safetensors")]
    elif case == "fp16":
        argv = ["--model", "tiny", "--model-path", str(root / "diffusers"), "--fp16"]
    else:  # a decoder whose <name>_encoder partner is a decoder too
        for part in ("decoder", "encoder"):
            (tmp_path / f"y_{part}.pth").write_bytes((root / "taesd_decoder.pth").read_bytes())
        argv = ["--model-path", str(tmp_path / "y_decoder.pth")]
    code = main(["eval-vae", "--data", str(SAMPLE), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
